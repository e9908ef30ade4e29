"""Fixed per-task loss weights (default 1). Temperature sampling lives in the sampler; this is
the balancer of every T=1 / T=5 / T=100 run."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from polycats.balance.base import BalancerContext, StepPlan
from polycats.ops.task_gradients import TaskStats


class ScalarBalancer:
    """``Σ_i w_i S_i / N`` with fixed ``weights`` (task -> weight, default 1): one backward pass.

    >>> ScalarBalancer(["de-en", "sw-en"], {"sw-en": 2.0}).loss_weights().tolist()
    [1.0, 2.0]
    """

    def __init__(self, tasks: list[str], weights: dict[str, float] | None = None):
        self.tasks = list(tasks)
        weights = weights or {}
        self.weights = torch.tensor([float(weights.get(task, 1.0)) for task in self.tasks])

    def bind(self, context: BalancerContext) -> None:
        pass

    def plan(self, update: int) -> StepPlan:
        return StepPlan(task_gradients=False)

    def observe_validation(self, stats: TaskStats) -> None:
        raise ValueError("the scalar balancer never plans validation statistics")

    def loss_weights(self) -> Tensor:
        return self.weights

    def observe_losses(self, losses: Tensor, tokens: Tensor) -> None:
        pass

    def combine(self, stats: TaskStats) -> Tensor:
        assert stats.grads is not None
        return self.weights.to(stats.grads) @ stats.grads

    def log_values(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
