"""Per-task gradients ``G`` ``[K, P]`` and what one step knows about its tasks (:class:`TaskStats`):
the gradient layer below both the balancers and the diagnostics.

:func:`per_task_gradients` runs one loss closure and backward pass per task (any model, any
loss; :class:`~polycats.ops.task_split.TaskSplit` gets the same ``G`` from one pass for the
model types it hooks). Each row is the gradient of task ``i``'s *contribution* to the usual loss,
so ``Σ_i g_i`` is the usual gradient.

>>> import torch
>>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
>>> stats = per_task_gradients([w], [lambda: (w * w).sum(), None, lambda: TaskLoss(w[0], mean=3.0, tokens=2)])
>>> stats.grads.tolist(), stats.losses.tolist(), stats.tokens.tolist()
([[2.0, 4.0], [0.0, 0.0], [1.0, 0.0]], [5.0, 0.0, 3.0], [1.0, 0.0, 2.0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

CurvatureProbe = Callable[[Tensor], float]
"""``d -> dᵀHd / ‖d‖²`` for a flat direction ``d`` in the layout of the gradient rows."""


@dataclass
class TaskStats:
    """What one step knows about its tasks.

    losses:    ``[K]`` mean token loss ``L_i`` of each task (0 where the task is absent);
    tokens:    ``[K]`` target tokens ``n_i`` of each task (0 where absent);
    grads:     ``[K, P]`` flattened ``g_i`` (zero rows for absent tasks), or None;
    curvature: the curvature probe on the batches these statistics come from, when planned.
    """

    losses: Tensor
    tokens: Tensor
    grads: Tensor | None = None
    curvature: CurvatureProbe | None = None

    @property
    def present(self) -> Tensor:
        return self.tokens > 0



@dataclass
class TaskLoss:
    """A task's loss for one step.

    loss:   its contribution to the usual total loss (``S_i / N``), with autograd graph;
    mean:   its mean token loss ``L_i`` (defaults to ``loss``);
    tokens: its number of target tokens ``n_i`` (defaults to 1).
    """

    loss: Tensor
    mean: float | None = None
    tokens: int = 1


TaskClosure = Callable[[], "TaskLoss | Tensor"]


# Columns per chunk in gram_matrix and weighted_sum: long enough for the products to stream,
# short enough that a 1.4M-parameter model gives the two cores ~175 chunks to share.
GRAM_CHUNK = 8192


def _column_chunks(rows: Tensor) -> tuple[Tensor, Tensor]:
    """``[K, P]`` as ``[chunks, K, GRAM_CHUNK]`` (a view) and the ``[K, P mod GRAM_CHUNK]`` tail."""
    k, size = rows.shape
    chunks = size // GRAM_CHUNK
    whole = chunks * GRAM_CHUNK
    return rows[:, :whole].reshape(k, chunks, GRAM_CHUNK).transpose(0, 1), rows[:, whole:]


def gram_matrix(rows: Tensor) -> Tensor:
    """``rows @ rows.T`` (float64, CPU) of ``[K, P]`` per-task gradients.

    A ``[K, P] x [P, K]`` product with small ``K`` runs on one core; cut into column chunks
    multiplied as one ``bmm`` batch it runs on all, and sums shorter float32 runs.
    """
    blocks, tail = _column_chunks(rows.detach())
    gram = torch.bmm(blocks, blocks.transpose(1, 2)).to(torch.float64).sum(0)
    return (gram + (tail @ tail.T).to(torch.float64)).to("cpu")


def weighted_sum(weights: Tensor, rows: Tensor) -> Tensor:
    """``weights @ rows``: the ``[P]`` direction ``Σ_i w_i g_i`` of ``[K, P]`` rows, chunked like
    :func:`gram_matrix` (all cores instead of one)."""
    rows = rows.detach()
    weights = weights.to(rows)
    blocks, tail = _column_chunks(rows)
    out = torch.empty(rows.shape[1], dtype=rows.dtype, device=rows.device)
    whole = blocks.shape[0] * GRAM_CHUNK
    torch.bmm(weights.expand(blocks.shape[0], 1, -1), blocks, out=out[:whole].view(-1, 1, GRAM_CHUNK))
    torch.mv(tail.T, weights, out=out[whole:])
    return out


def flat_gradient(loss: Tensor, params: Sequence[Tensor], out: Tensor) -> None:
    """Write ``d loss / d params`` flattened into ``out`` (zeros for unused parameters)."""
    if any(param.dtype != out.dtype or param.device != out.device for param in params):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        torch.cat([out.new_zeros(p.numel()) if g is None else g.reshape(-1).to(out) for p, g in zip(params, grads)], out=out)
        return
    # The backward pass accumulates straight into views of ``out`` (no per-parameter copies);
    # whatever .grad held before is put back afterwards.
    saved = [param.grad for param in params]
    out.zero_()
    for param, view in zip(params, out.split([param.numel() for param in params])):
        param.grad = view.view_as(param)
    try:
        torch.autograd.backward(loss, inputs=params)
    finally:
        for param, grad in zip(params, saved):
            param.grad = grad


def accumulate_into_grad(params: Sequence[Tensor], direction: Tensor) -> None:
    """Add the flat ``direction`` to each parameter's ``.grad`` (PyTorch's accumulate convention).

    A parameter without ``.grad`` gets a view of ``direction`` rather than a copy: the caller
    hands ``direction`` over and must not write to it afterwards."""
    for param, piece in zip(params, direction.split([param.numel() for param in params])):
        piece = piece.view_as(param).to(param.dtype)
        if param.grad is None:
            param.grad = piece
        else:
            param.grad.add_(piece)


def gradient_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """The dtype of per-task gradient rows: the parameters' own, but never below float32."""
    dtype = torch.float32
    for param in params:
        dtype = torch.promote_types(dtype, param.dtype)
    return dtype


def per_task_gradients(params: Sequence[Tensor], closures: Sequence[TaskClosure | None]) -> TaskStats:
    """Run each task's closure and backward pass; ``None`` marks a task absent from this batch."""
    total = sum(p.numel() for p in params)
    device = params[0].device
    # Each row is written once, zeros included.
    grads = torch.empty(len(closures), total, device=device, dtype=gradient_dtype(params))
    losses = torch.zeros(len(closures))
    tokens = torch.zeros(len(closures))
    for i, closure in enumerate(closures):
        if closure is None:
            grads[i].zero_()
            continue
        result = closure()
        task = result if isinstance(result, TaskLoss) else TaskLoss(result)
        flat_gradient(task.loss, params, grads[i])
        losses[i] = float(task.loss.detach()) if task.mean is None else float(task.mean)
        tokens[i] = task.tokens
    return TaskStats(losses=losses, tokens=tokens, grads=grads)
