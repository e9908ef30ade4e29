"""Fixed per-task loss weights (default 1). Temperature sampling lives in the sampler; this is
the balancer of every T=1 / T=5 / T=100 run."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from polycats.balance.base import TaskStats


class ScalarBalancer:
    needs_task_gradients = False

    def __init__(self, tasks: list[str], weights: dict[str, float] | None = None):
        self.tasks = list(tasks)
        weights = weights or {}
        self.weights = torch.tensor([float(weights.get(task, 1.0)) for task in self.tasks])

    def loss_weights(self) -> Tensor:
        return self.weights

    def combine(self, stats: TaskStats) -> Tensor:
        assert stats.grads is not None
        return self.weights.to(stats.grads) @ stats.grads

    def log_values(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
