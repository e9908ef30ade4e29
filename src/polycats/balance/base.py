"""The one interface every way of combining task losses/gradients implements.

Two families share it: **loss weighting** (scalar, CATS with ``source="valid"``, DRO) decides a
weight per task and the trainer backpropagates ``Σ_i w_i S_i / N`` once; **gradient
combination** (CATS, PCGrad, GradVac, MGDA, ...) receives the per-task gradients ``G`` ``[K, P]``
and returns the direction. A balancer says which, step by step, in its :class:`StepPlan`.

One training step, as the trainer runs it (and a plain loop may)::

    balancer.bind(BalancerContext(named_parameters))       # once, before the first step
    plan = balancer.plan(update)
    if plan.validation:                                     # before the step
        balancer.observe_validation(stats_on_the_fixed_validation_sample)
    if plan.task_gradients:
        direction = balancer.combine(stats_with_grads)      # accumulated into .grad
    else:
        (balancer.loss_weights() @ task_sums / N).backward()
        balancer.observe_losses(losses, tokens)             # only if the step is taken

``stats.curvature`` is set when ``plan.curvature``: ``d -> dᵀHd / ‖d‖²`` on the batches the
statistics come from. Notation (``docs/cats.md``): task ``i`` contributes the token-NLL sum
``S_i`` over its ``n_i`` target tokens, ``N = Σ_i n_i``, ``L_i = S_i / n_i``,
``g_i = ∇(S_i / N)``, so ``Σ_i g_i`` is the usual gradient.

>>> import torch
>>> from polycats.balance.scalar import ScalarBalancer
>>> balancer = ScalarBalancer(["de-en", "sw-en"], {"sw-en": 2.0})
>>> balancer.plan(0)
StepPlan(task_gradients=False, validation=False, curvature=False)
>>> balancer.loss_weights().tolist()
[1.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from polycats.ops.task_gradients import TaskClosure, TaskStats, accumulate_into_grad, per_task_gradients


@dataclass(frozen=True)
class StepPlan:
    """What a balancer needs from the trainer for one training step.

    task_gradients: per-task gradients of the training batch, for :meth:`Balancer.combine`
                    (else one backward pass of the loss-weighted sum, then ``observe_losses``);
    validation:     per-task statistics of the fixed validation sample, for
                    :meth:`Balancer.observe_validation` before the step;
    curvature:      a curvature probe (``TaskStats.curvature``) in the statistics of this step.
    """

    task_gradients: bool
    validation: bool = False
    curvature: bool = False


@dataclass(frozen=True)
class BalancerContext:
    """What a balancer learns once, before the first step: the trainable named parameters in the
    order of the flat gradient rows (a per-tensor method cuts ``G`` by them)."""

    parameters: list[tuple[str, Tensor]]


@runtime_checkable
class Balancer(Protocol):
    tasks: list[str]

    def bind(self, context: BalancerContext) -> None:
        """Once, before the first step."""
        ...

    def plan(self, update: int) -> StepPlan:
        """What the training step after ``update`` updates needs (called once per step)."""
        ...

    def observe_validation(self, stats: TaskStats) -> None:
        """Statistics of the fixed validation sample, on the steps whose plan asks for them."""
        ...

    def combine(self, stats: TaskStats) -> Tensor:
        """The ``[P]`` training direction from per-task gradients (``stats.grads`` is set)."""
        ...

    def loss_weights(self) -> Tensor:
        """``[K]`` weights on the task losses, for a step planned without per-task gradients."""
        ...

    def observe_losses(self, losses: Tensor, tokens: Tensor) -> None:
        """After a step taken with ``loss_weights``: its ``[K]`` mean task losses and tokens."""
        ...

    def log_values(self) -> dict[str, float]:
        """Flat metrics to log after a step, e.g. ``{"alpha/sw-en": 1.3, "lambda": 0.7}``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class GradientCombiner:
    """The shared part of the balancers that combine per-task gradients on every step (GradVac
    and the torchjd peers): they plan gradients always, have no loss weights (ones) and use no
    validation statistics. A subclass sets ``tasks`` and implements ``combine``."""

    tasks: list[str]

    def plan(self, update: int) -> StepPlan:
        return StepPlan(task_gradients=True)

    def observe_validation(self, stats: TaskStats) -> None:
        raise ValueError(f"{type(self).__name__} never plans validation statistics")

    def loss_weights(self) -> Tensor:
        return torch.ones(len(self.tasks))

    def observe_losses(self, losses: Tensor, tokens: Tensor) -> None:
        pass


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
