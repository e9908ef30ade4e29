"""Per-task gradients ``G`` ``[K, P]`` from one forward and one backward pass over a whole batch.

The sentences of a batch do not interact, so a parameter's gradient is a sum over activation rows
and task ``i``'s gradient is the same sum over its own rows. :class:`TaskSplit` runs the batch
once with the parameters' ``requires_grad`` off and module hooks write each parameter's per-task
sums into the rows of ``G``: the floating-point work of one ordinary backward pass, without the
fixed cost of one pass per task (costs: ``docs/performance.md``). Supported: ``nn.Linear``,
``nn.LayerNorm`` (affine), ``nn.Embedding`` and weights passed to a :class:`TiedProjection`;
activations ``[rows, positions, features]`` with rows sorted by task, or ``[tokens, features]``.
:meth:`TaskSplit.supports` says whether a model qualifies; the trainer falls back to one pass
per task sub-batch (:func:`polycats.ops.task_gradients.per_task_gradients`) otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polycats.model.transformer import TiedProjection


class TaskSplit:
    """Collects per-task gradients of ``model``'s ``params`` during one pass (see the module
    docstring); ``G`` columns follow the order of ``params``."""

    def __init__(self, model: nn.Module, params: Sequence[Tensor]):
        self.model = model
        self.params = list(params)
        self.offsets: dict[Tensor, int] = {}
        offset = 0
        for param in self.params:
            self.offsets[param] = offset
            offset += param.numel()
        self.size = offset
        self._out: Tensor | None = None

    @staticmethod
    def supports(model: nn.Module, params: Sequence[Tensor]) -> bool:
        """Whether every parameter in ``params`` is owned by a module type this class handles."""
        covered = set()
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding)):
                covered.update(module.parameters(recurse=False))
            elif next(module.parameters(recurse=False), None) is not None:
                return False
        return all(param in covered for param in params)

    @contextlib.contextmanager
    def collect(self, row_tasks: Tensor, row_tokens: Tensor, num_tasks: int, out: Tensor) -> Iterator[None]:
        """Run the forward and backward pass of the batch inside; ``out`` ``[K, P]`` then holds
        each task's gradient (zeros for absent tasks and for parameters the pass did not reach).

        row_tasks:  ``[B]`` task of each row, sorted (rows of a task are contiguous).
        row_tokens: ``[B]`` target tokens of each row (segments the ``[tokens, features]`` input
                    of the output projection).

        ``out`` is written, not accumulated into: each parameter's block is overwritten by the
        first hook that reaches it (so ``out`` needs no zeroing), and passing the same ``out``
        every step also reuses its views.
        """
        if row_tasks.numel() > 1 and bool((row_tasks[1:] < row_tasks[:-1]).any()):
            raise ValueError("TaskSplit.collect needs the batch's rows sorted by task")
        rows = torch.bincount(row_tasks, minlength=num_tasks).tolist()
        tokens = torch.zeros(num_tasks, dtype=torch.long, device=row_tasks.device)
        tokens = tokens.index_add_(0, row_tasks, row_tokens.long()).tolist()
        self._row_segments = _task_segments(rows)
        self._token_segments = _task_segments(tokens)
        if out is not self._out:
            self._out = out
            self._blocks = {param: out[:, start : start + param.numel()] for param, start in self.offsets.items()}
            self._views = {param: [row.view_as(param) for row in self._blocks[param]] for param in self.offsets}
        self._unwritten = set(self.offsets)
        handles = [module.register_forward_hook(hook) for module, hook in self._hooks()]
        flags = [param.requires_grad for param in self.params]
        for param in self.params:
            param.requires_grad_(False)  # autograd skips the weight gradients; the hooks do them per task
        try:
            yield
            for param in self._unwritten:  # not reached by this pass: a zero gradient
                self._blocks[param].zero_()
        finally:
            for param, flag in zip(self.params, flags):
                param.requires_grad_(flag)
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------ hooks

    def _hooks(self) -> list[tuple[nn.Module, Callable]]:
        hooks = []
        for module in self.model.modules():
            if isinstance(module, nn.Linear):
                hooks.append((module, self._on_linear))
            elif isinstance(module, TiedProjection):
                hooks.append((module, self._on_tied))
            elif isinstance(module, nn.LayerNorm):
                hooks.append((module, self._on_layer_norm))
            elif isinstance(module, nn.Embedding):
                hooks.append((module, self._on_embedding))
        return hooks

    def _segments(self, x: Tensor) -> list[tuple[int, int, int]]:
        """``(task, start, end)`` along dim 0 of an activation of this batch, present tasks only."""
        return self._row_segments if x.dim() >= 3 else self._token_segments

    def _first_write(self, param: Tensor, segments: list[tuple[int, int, int]]) -> bool:
        """True once per pass for each collected parameter: its block of ``out`` still holds
        whatever was there before, so the rows of the tasks in ``segments`` are to be overwritten
        rather than added to; the other tasks' rows are zeroed here."""
        if param not in self._unwritten:
            return False
        self._unwritten.discard(param)
        views = self._views[param]
        for task in set(range(len(views))) - {task for task, _, _ in segments}:
            views[task].zero_()
        return True

    def _add_row_sums(self, param: Tensor | None, values: Tensor) -> None:
        """Each task's sum of ``values`` ``[rows, ..., *param.shape]`` over its rows (or tokens)
        into its gradient of ``param``: one reduction per task over its contiguous rows (a sum
        per row over the middle dimension, then ``index_add_``, measured up to 2x slower)."""
        if param is None or param not in self.offsets:
            return
        dims = tuple(range(values.dim() - param.dim()))
        views = self._views[param]
        values = values.to(views[0].dtype)  # under autocast the hooks see bf16/fp16; the rows stay fp32
        segments = self._segments(values)
        first = self._first_write(param, segments)
        for task, start, end in segments:
            if first:
                torch.sum(values[start:end], dims, out=views[task])
            else:
                views[task].add_(values[start:end].sum(dims))

    def _linear_sums(self, x: Tensor, grad: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        if weight in self.offsets:
            views = self._views[weight]
            segments = self._segments(x)
            first = self._first_write(weight, segments)
            dtype = views[0].dtype  # under autocast x and grad are bf16/fp16; the rows stay fp32
            for task, start, end in segments:
                xs = x[start:end].reshape(-1, x.shape[-1]).to(dtype)
                gs = grad[start:end].reshape(-1, grad.shape[-1]).to(dtype)
                if first:
                    torch.mm(gs.T, xs, out=views[task])
                else:
                    views[task].addmm_(gs.T, xs)
        self._add_row_sums(bias, grad)

    def _on_linear(self, module: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0].detach()
        if output.requires_grad:
            output.register_hook(lambda grad: self._linear_sums(x, grad, module.weight, module.bias))

    def _on_tied(self, module: TiedProjection, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x, weight = inputs[0].detach(), inputs[1]
        if output.requires_grad:
            output.register_hook(lambda grad: self._linear_sums(x, grad, weight, None))

    def _on_layer_norm(self, module: nn.LayerNorm, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0].detach()

        def sums(grad: Tensor) -> None:
            if module.weight in self.offsets:
                self._add_row_sums(module.weight, grad * F.layer_norm(x, module.normalized_shape, eps=module.eps))
            self._add_row_sums(module.bias, grad)

        if output.requires_grad:
            output.register_hook(sums)

    def _on_embedding(self, module: nn.Embedding, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        ids = inputs[0]

        def sums(grad: Tensor) -> None:
            if module.weight not in self.offsets:
                return
            if module.padding_idx is not None:  # nn.Embedding never updates the padding row
                grad = grad * (ids != module.padding_idx).unsqueeze(-1).to(grad.dtype)
            views = self._views[module.weight]
            grad = grad.to(views[0].dtype)
            segments = self._segments(grad)
            if self._first_write(module.weight, segments):
                for task, _, _ in segments:  # index_add_ below only adds
                    views[task].zero_()
            for task, start, end in segments:
                views[task].index_add_(0, ids[start:end].reshape(-1), grad[start:end].reshape(-1, grad.shape[-1]))

        # The weights do not require grad here, so the lookup is where the graph starts.
        output = output.detach().requires_grad_()
        output.register_hook(sums)
        return output


def _task_segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """``(task, start, end)`` of each task with a nonzero count, in order."""
    segments, start = [], 0
    for task, count in enumerate(counts):
        if count:
            segments.append((task, start, start + count))
        start += count
    return segments
