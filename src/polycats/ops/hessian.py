"""Hessian-vector products: a :class:`HessianOperator` is anything with ``size`` (the number of
selected parameters ``P``), ``dtype``, ``device`` and ``matvec(v: Tensor[P]) -> Tensor[P]``
(``H v`` for the Hessian of one loss closure). :class:`DoubleBackwardHVP` (``autograd.grad`` of
the gradient against ``v``, the first-order graph built once and reused; the default) and
:class:`ForwardOverReverseHVP` (``torch.func`` jvp of grad). Both run the model under the math
attention kernel: the fused CPU kernel has neither a double backward nor a forward-mode
derivative. Algorithms that take any operator: :mod:`polycats.diagnostics.curvature`.

>>> import torch
>>> model = torch.nn.Linear(2, 1, bias=False)
>>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
>>> dense_matrix(hessian_operator(model, lambda: (model(x) ** 2).sum())).tolist()  # 2 xᵀx
[[2.0, 0.0], [0.0, 8.0]]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from polycats.ops.losses import LossClosure, ParameterFilter, eval_mode, mean_loss, select_parameters


@runtime_checkable
class HessianOperator(Protocol):
    """``v -> H v`` for the Hessian ``H`` of one loss w.r.t. ``size`` flattened parameters."""

    size: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: Tensor) -> Tensor: ...


@contextlib.contextmanager
def _second_order_context(model: nn.Module, use_eval_mode: bool) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if use_eval_mode:
            stack.enter_context(eval_mode(model))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


class _ParameterOperator:
    """What both operators share: the selected parameters and the flat layout."""

    def __init__(
        self, model: nn.Module, loss: LossClosure, parameters: ParameterFilter | None, use_eval_mode: bool
    ):
        named = select_parameters(model, parameters)
        if not named:
            raise ValueError("no trainable parameter selected")
        self.model = model
        self.loss = loss
        self.use_eval_mode = use_eval_mode
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.size = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.matvecs = 0

    def _split(self, v: Tensor) -> list[Tensor]:
        if v.shape != (self.size,):
            raise ValueError(f"expected a vector of {self.size} entries, got shape {tuple(v.shape)}")
        v = v.to(dtype=self.dtype, device=self.device)
        return [piece.view(shape) for piece, shape in zip(v.split([s.numel() for s in self.shapes]), self.shapes)]

    def _flatten(self, pieces: Sequence[Tensor | None]) -> Tensor:
        return torch.cat(
            [
                torch.zeros(p.numel(), dtype=self.dtype, device=self.device) if g is None else g.reshape(-1)
                for p, g in zip(self.params, pieces)
            ]
        )


class DoubleBackwardHVP(_ParameterOperator):
    """``H v = d(g . v)/d theta`` by a second backward pass through the gradient's graph.

    reuse_graph: build the gradient (with ``create_graph=True``) once and keep its graph for every
    product (PyHessian's choice: one backward-of-backward per product, at the memory cost of the
    retained graph). ``False`` recomputes the forward and first backward for each product.

    With a reused graph the operator is a snapshot of the parameters at its first product: build
    a new one after an optimiser step (autograd raises if the parameters were changed in place).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossClosure,
        *,
        parameters: ParameterFilter | None = None,
        use_eval_mode: bool = True,
        reuse_graph: bool = True,
    ):
        super().__init__(model, loss, parameters, use_eval_mode)
        self.reuse_graph = reuse_graph
        self._grads: list[Tensor | None] | None = None

    def _gradient_graph(self) -> list[Tensor | None]:
        with _second_order_context(self.model, self.use_eval_mode):
            value = mean_loss(self.loss())
            grads = torch.autograd.grad(value, self.params, create_graph=True, allow_unused=True)
        # A gradient without a graph is constant in theta: its Hessian rows are zero.
        return [g if g is not None and g.requires_grad else None for g in grads]

    def matvec(self, v: Tensor) -> Tensor:
        pieces = self._split(v)
        if self.reuse_graph:
            if self._grads is None:
                self._grads = self._gradient_graph()
            grads = self._grads
        else:
            grads = self._gradient_graph()
        live = [i for i, g in enumerate(grads) if g is not None]
        products: list[Tensor | None] = [None] * len(self.params)
        if live:
            with sdpa_kernel(SDPBackend.MATH):
                hv = torch.autograd.grad(
                    [grads[i] for i in live],
                    self.params,
                    grad_outputs=[pieces[i] for i in live],
                    retain_graph=self.reuse_graph,
                    allow_unused=True,
                )
            products = list(hv)
        self.matvecs += 1
        return self._flatten(products).detach()

    def release(self) -> None:
        """Drop the retained graph (it is rebuilt on the next product)."""
        self._grads = None


class _ClosureModule(nn.Module):
    """Lets ``functional_call`` swap the parameters that a closure's model uses."""

    def __init__(self, model: nn.Module, loss: LossClosure):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self) -> Tensor:
        return mean_loss(self.loss())


class ForwardOverReverseHVP(_ParameterOperator):
    """``H v`` as ``jvp(grad(L), (theta,), (v,))`` with ``torch.func``; one forward and one
    reverse pass, both carrying forward-mode tangents, per product."""

    def __init__(
        self,
        model: nn.Module,
        loss: LossClosure,
        *,
        parameters: ParameterFilter | None = None,
        use_eval_mode: bool = True,
    ):
        super().__init__(model, loss, parameters, use_eval_mode)
        self._wrapper = _ClosureModule(model, loss)

    def _loss_of(self, params: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(self._wrapper, params, ())

    def matvec(self, v: Tensor) -> Tensor:
        pieces = self._split(v)
        primals = {f"model.{name}": p.detach() for name, p in zip(self.names, self.params)}
        tangents = {f"model.{name}": piece for name, piece in zip(self.names, pieces)}
        with _second_order_context(self.model, self.use_eval_mode):
            _, hv = torch.func.jvp(torch.func.grad(self._loss_of), (primals,), (tangents,))
        self.matvecs += 1
        return self._flatten([hv[key] for key in primals]).detach()


HVP_METHODS: dict[str, type[_ParameterOperator]] = {
    "double_backward": DoubleBackwardHVP,
    "forward_over_reverse": ForwardOverReverseHVP,
}
#: The faster operator in our benchmark (see the module docstring).
DEFAULT_HVP = "double_backward"


def hessian_operator(
    model: nn.Module,
    loss: LossClosure,
    *,
    hvp: str = DEFAULT_HVP,
    parameters: ParameterFilter | None = None,
    use_eval_mode: bool = True,
) -> HessianOperator:
    """The Hessian operator of ``loss`` w.r.t. ``model``'s selected parameters.

    hvp: ``"double_backward"`` or ``"forward_over_reverse"``.
    """
    if hvp not in HVP_METHODS:
        raise ValueError(f"hvp must be one of {sorted(HVP_METHODS)}, not {hvp!r}")
    return HVP_METHODS[hvp](model, loss, parameters=parameters, use_eval_mode=use_eval_mode)


def dense_matrix(op: HessianOperator) -> Tensor:
    """The full ``[P, P]`` float64 matrix, one product per column (small operators only)."""
    eye = torch.eye(op.size, dtype=torch.float64)
    return torch.stack([matvec64(op, eye[i]) for i in range(op.size)], dim=1)


def matvec64(op: HessianOperator, v: Tensor) -> Tensor:
    """``op.matvec`` with float64 CPU vectors on the caller's side (the algorithms' convention)."""
    return op.matvec(v.to(dtype=op.dtype, device=op.device)).to(dtype=torch.float64, device="cpu")
