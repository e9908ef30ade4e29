"""Per-task gradients from loss closures: the library path for any model and any loss.

(The trainer gets the same ``G`` from one pass over the whole batch,
:mod:`polycats.balance.task_split`, for the model types it can hook.) Each task's sub-batch gets
its own forward and backward pass (so only one task's activations are alive at a time); its
flattened gradient becomes one row of ``G`` ``[K, P]``. Because each ``g_i`` is the gradient of
task ``i``'s *contribution* to the usual loss, ``sum_i g_i`` is exactly the usual full-batch
gradient: the passes together process the batch once, plus the fixed cost of each extra pass and
the memory for ``G``. The balancer turns ``G`` into one direction, which is accumulated into
``.grad`` so any optimiser can step on it.

Use it in a plain PyTorch loop::

    stats = backward_per_task(model.parameters(), [lambda: loss_de(), lambda: loss_sw()], balancer)
    optimizer.step()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from polycats.balance.base import Balancer, TaskStats


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


def backward_per_task(
    params: Iterable[Tensor], closures: Sequence[TaskClosure | None], balancer: Balancer
) -> TaskStats:
    """Per-task backward passes, then the balancer's combined direction accumulated into ``.grad``.

    Returns the step's :class:`TaskStats` (losses, tokens, per-task gradients) for logging.
    """
    params = [p for p in params if p.requires_grad]
    stats = per_task_gradients(params, closures)
    accumulate_into_grad(params, balancer.combine(stats))
    return stats
