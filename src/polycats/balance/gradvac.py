"""GradVac — Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021); the update rule, the
groups and what is logged: ``docs/peers.md``.

Per ordered task pair (and parameter group) an EMA target ``φ̂_ij`` of their cosine; whenever
``cos(g_i', g_j)`` is below it, ``g_i'`` is moved towards ``g_j`` until it is equal; the direction
is ``Σ_i g_i'``. Computed from each group's Gram matrix; ``grouping="per_tensor"`` needs the
parameter layout, which the trainer hands over in :meth:`GradVac.bind`.

>>> import torch
>>> from polycats.balance import GradVac, TaskStats
>>> gradvac = GradVac(["de-en", "sw-en"], beta=0.5)
>>> grads = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])        # cos = -0.71 < target 0
>>> d = gradvac.combine(TaskStats(torch.ones(2), torch.ones(2), grads))
>>> [round(float(x), 3) for x in d]                        # PCGrad's answer on the first step
[-0.5, 1.5]
>>> round(float(gradvac.targets[0, 0, 1]), 3)              # φ̂ ← 0.5 · 0 + 0.5 · (−0.707)
-0.354
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from polycats.balance.base import BalancerContext, GradientCombiner
from polycats.balance.torchjd_peers import PeerRecord, fit_weights
from polycats.balancer_config import GradVacConfig
from polycats.ops.task_gradients import TaskStats, gram_matrix


def vaccinate(gram: Tensor, targets: Tensor, beta: float, eps: float = 1e-8) -> tuple[Tensor, int]:
    """One GradVac pass on one group: the coefficients ``C`` ``[m, m]`` with ``g_i' = Σ_k C_ik g_k``
    and the number of corrections. ``gram`` is the float64 ``[m, m]`` Gram matrix of the rows;
    ``targets`` (float64 ``[m, m]``, ``φ̂_ij`` at ``[i, j]``) is updated in place."""
    m = gram.shape[0]
    coefficients = torch.eye(m, dtype=torch.float64)
    corrections = 0
    for i in range(m):
        dots = coefficients[i] @ gram  # g_i' · g_k for every k
        others = [j for j in range(m) if j != i]
        order = [others[t] for t in torch.randperm(len(others)).tolist()]
        for j in order:
            norm_i = math.sqrt(max(float(dots @ coefficients[i]), 0.0))
            norm_j = math.sqrt(max(float(gram[j, j]), 0.0))
            cosine = float(dots[j]) / (norm_i * norm_j + eps)
            target = float(targets[i, j])
            if cosine < target:
                root_cos = math.sqrt(max(1.0 - cosine * cosine, 0.0))
                root_target = math.sqrt(max(1.0 - target * target, 0.0))
                w = norm_i * (target * root_cos - cosine * root_target) / (norm_j * root_target + eps)
                coefficients[i, j] += w
                dots = dots + w * gram[j]
                corrections += 1
            targets[i, j] = (1.0 - beta) * target + beta * cosine
    return coefficients, corrections


def tensor_groups(named_parameters: Iterable[tuple[str, Tensor]]) -> list[slice]:
    """One slice of the flat gradient per parameter tensor (in the given order)."""
    groups, offset = [], 0
    for _, param in named_parameters:
        groups.append(slice(offset, offset + param.numel()))
        offset += param.numel()
    return groups


class GradVac(GradientCombiner):
    """Gradient Vaccine as a balancer (every step with per-task gradients): ``combine`` returns ``Σ_i g_i'``.

    ``GradVac(tasks, config=None, **overrides)``; overrides are :class:`GradVacConfig` fields.
    """

    def __init__(self, tasks: Sequence[str], config: GradVacConfig | None = None, **overrides: Any):
        if not tasks:
            raise ValueError("GradVac needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"GradVac task names must be unique, got {list(tasks)}")
        base = (config or GradVacConfig()).model_dump()
        self.config = GradVacConfig.model_validate({**base, **overrides})
        self.tasks = list(tasks)
        # Slices of the flat gradient, one per group; None is one group (the whole model).
        self.groups: list[slice] | None = None
        self._targets: Tensor | None = None  # [groups, K, K] float64, allocated on first use
        self.record = PeerRecord()
        self._corrections_total = 0

    def set_parameters(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        """Tell GradVac the layout of the flat gradient (trainable named parameters, in order);
        sets :attr:`groups` for ``grouping="per_tensor"``, nothing for ``whole_model``."""
        if self.config.grouping == "per_tensor":
            self.groups = tensor_groups(named_parameters)

    @property
    def targets(self) -> Tensor:
        """The targets ``φ̂`` ``[groups, K, K]`` (float64 copy; zeros before the first step)."""
        if self._targets is None:
            k = len(self.tasks)
            return torch.zeros(len(self.groups or [None]), k, k, dtype=torch.float64)
        return self._targets.clone()

    # ------------------------------------------------------------------ Balancer protocol

    def bind(self, context: BalancerContext) -> None:
        self.set_parameters(context.parameters)

    def combine(self, stats: TaskStats) -> Tensor:
        grads = stats.grads
        if grads is None:
            raise ValueError("GradVac needs per-task gradients (stats.grads is None)")
        k = len(self.tasks)
        if grads.ndim != 2 or grads.shape[0] != k:
            raise ValueError(f"GradVac expects gradients [{k}, P], got {tuple(grads.shape)}")
        groups = self._checked_groups(grads.shape[1])
        if self._targets is None:
            self._targets = torch.zeros(len(groups), k, k, dtype=torch.float64)
        self.record.steps += 1
        index = [int(i) for i in torch.nonzero(stats.present.cpu()).reshape(-1)]
        if not index:
            self.record.record_absent()
            return torch.zeros_like(grads[0])
        rows = grads if len(index) == k else grads[index]
        if not bool(torch.isfinite(rows).all()):
            self.record.skipped_nonfinite += 1
            return rows.sum(0)
        if self.config.task_gradient == "mean_loss":
            tokens = stats.tokens.detach().to("cpu", torch.float64)[index]
            scale = tokens.sum() / tokens
        else:
            scale = torch.ones(len(index), dtype=torch.float64)

        direction = torch.empty_like(grads[0])
        total_gram = torch.zeros(len(index), len(index), dtype=torch.float64)
        corrections = 0
        weights_per_group = []
        selector = torch.tensor(index)
        for g, part in enumerate(groups):
            block = rows[:, part]
            gram = gram_matrix(block)
            total_gram += gram
            targets = self._targets[g][selector][:, selector]
            coefficients, made = vaccinate(gram * scale[:, None] * scale[None, :], targets, self.config.beta,
                                           self.config.eps)
            self._targets[g][selector[:, None], selector[None, :]] = targets
            corrections += made
            weights = coefficients.sum(0) * scale
            weights_per_group.append(weights)
            direction[part] = weights.to(block) @ block

        if len(groups) == 1:
            weights, residual = weights_per_group[0], None
        else:
            weights, residual = fit_weights(rows, total_gram, direction)
        self._corrections_total += corrections
        self.record.record(self.tasks, index, weights, total_gram, float(direction.double().pow(2).sum()), residual)
        present_targets = self._targets[:, selector][:, :, selector]
        off_diagonal = ~torch.eye(len(index), dtype=torch.bool).expand_as(present_targets)
        chosen = present_targets[off_diagonal]
        self._last_corrections = corrections
        self._last_target_mean = float(chosen.mean()) if chosen.numel() else 0.0
        self._last_target_min = float(chosen.min()) if chosen.numel() else 0.0
        return direction

    def log_values(self) -> dict[str, float]:
        values = self.record.log_values()
        values.update({
            "gradvac/corrections_total": float(self._corrections_total),
            "gradvac/groups": float(len(self.groups or [None])),
        })
        if "norm_ratio" in self.record.last:
            values["gradvac/corrections"] = float(self._last_corrections)
            values["gradvac/target_mean"] = self._last_target_mean
            values["gradvac/target_min"] = self._last_target_min
        return values

    def state_dict(self) -> dict[str, Any]:
        """The targets and counters (``torch.load(weights_only=True)`` safe)."""
        return {"targets": self.targets, "corrections_total": self._corrections_total, **self.record.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.state_dict()) - set(state)
        if missing:
            raise ValueError(f"GradVac state is missing {sorted(missing)}")
        targets = state["targets"].detach().to("cpu", torch.float64).clone()
        k = len(self.tasks)
        groups = len(self.groups or [None])
        if tuple(targets.shape) != (groups, k, k):
            raise ValueError(
                f"GradVac state has targets of shape {tuple(targets.shape)}, expected ({groups}, {k}, {k}) "
                f"for tasks {self.tasks} and grouping {self.config.grouping!r}"
            )
        self._targets = targets
        self._corrections_total = int(state["corrections_total"])
        self.record.load_state_dict(state)

    # ------------------------------------------------------------------ internals

    def _checked_groups(self, size: int) -> list[slice]:
        if self.groups is None:
            if self.config.grouping == "per_tensor":
                raise ValueError(
                    "gradvac.grouping=per_tensor needs the parameter layout: call "
                    "gradvac.set_parameters(model.named_parameters()) (the trainer binds it) or set gradvac.groups"
                )
            return [slice(0, size)]
        position = 0
        for part in self.groups:
            start, stop, step = part.indices(size)
            if start != position or step != 1 or stop <= start or part.stop is None or part.stop > size:
                raise ValueError(
                    f"GradVac groups must be consecutive non-empty slices partitioning [0, {size}); got {self.groups}"
                )
            position = stop
        if position != size:
            raise ValueError(f"GradVac groups cover [0, {position}) but the gradient has {size} entries")
        return list(self.groups)
