"""The one small interface every way of combining task losses/gradients implements.

Two families share it:

* **loss weighting** (scalar/temperature weights, CATS, DRO) decides a weight per task; the
  training gradient is ``sum_i w_i g_i``.
* **gradient combination** (PCGrad, MGDA, UPGrad, ...) receives the per-task gradients and returns
  the combined direction.

``needs_task_gradients`` tells the trainer whether to pay for per-task gradients (the ``K x P``
matrix from one hooked pass over the batch, :mod:`polycats.balance.task_split`, or one backward
pass per task, :mod:`polycats.balance.task_gradients`). A balancer that does not need
them only provides ``loss_weights()`` and the trainer does one ordinary backward pass of
``sum_i w_i S_i / N``.

Optional hooks, called by the trainer only when a balancer has them (``getattr``):

* ``observe_losses(losses [K], tokens [K])`` — after each loss-weighted step's backward pass, the
  step's per-task mean losses ``L_i`` and target tokens ``n_i`` (0 = absent); for weights that
  follow the losses (χ²-DRO).
* ``set_parameters(named_parameters)`` — once, the trainable named parameters in the order of the
  flat gradient rows; for per-parameter-group methods (GradVac).
* ``wants_valid_stats(update)`` / ``observe(stats)`` and ``curvature_probe`` — CATS
  (``polycats.balance.cats``).
* ``task_gradients_now()`` — before each step, whether this step needs per-task gradients
  (default: ``needs_task_gradients``); CATS with ``update_every > 1`` says no between its α
  updates, and those steps go the loss-weighted way (``loss_weights``, ``observe_losses``).

Notation (``docs/cats.md``): on a batch, task ``i`` contributes the token-NLL sum ``S_i`` over its
``n_i`` target tokens, ``N = sum_i n_i``; ``L_i = S_i / n_i`` and ``g_i = grad(S_i / N)``, so
``sum_i g_i`` is the usual gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@dataclass
class TaskStats:
    """What one training step knows about its tasks.

    losses: ``[K]`` mean token loss ``L_i`` of each task (0 where the task is absent).
    tokens: ``[K]`` target tokens ``n_i`` of each task in the batch (0 where absent).
    grads:  ``[K, P]`` flattened ``g_i`` (zero rows for absent tasks), or None when the balancer
            does not need per-task gradients.
    """

    losses: Tensor
    tokens: Tensor
    grads: Tensor | None = None

    @property
    def present(self) -> Tensor:
        return self.tokens > 0


@runtime_checkable
class Balancer(Protocol):
    tasks: list[str]
    needs_task_gradients: bool

    def loss_weights(self) -> Tensor:
        """``[K]`` weights on the task losses for the next step (used when no task gradients)."""
        ...

    def combine(self, stats: TaskStats) -> Tensor:
        """The ``[P]`` training direction from per-task gradients (``stats.grads`` is set)."""
        ...

    def log_values(self) -> dict[str, float]:
        """Flat metrics to log after a step, e.g. ``{"alpha/sw-en": 1.3, "lambda": 0.7}``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
