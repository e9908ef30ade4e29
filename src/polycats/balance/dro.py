"""χ²-DRO over languages (Zhou, Levy, Li, Ghazvininejad & Neubig, 2021, "Distributionally Robust
Multilingual Machine Translation"); the math, the schedule and what is logged: ``docs/peers.md``.

Train on the worst case over task distributions ``q`` within a χ² ball of radius ``rho`` around
the sampling distribution ``p``, against an EMA of each task's mean training loss: a
loss-weighting balancer with weights ``w_i = q_i / p_i``, updated from :meth:`observe_losses`.
:func:`chi2_worst_case` solves the inner problem exactly.

>>> import torch
>>> from polycats.balance import ChiSquareDRO
>>> dro = ChiSquareDRO(["de-en", "sw-en"], [0.8, 0.2], rho=0.1)
>>> dro.observe_losses(torch.tensor([2.0, 4.0]), torch.tensor([800.0, 200.0]))
>>> [round(float(w), 3) for w in dro.loss_weights()]   # the LoRes task's loss is up-weighted
[0.842, 1.632]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polycats.balance.base import BalancerContext, StepPlan
from polycats.balancer_config import DROConfig
from polycats.ops.task_gradients import TaskStats


def chi2_divergence(q: np.ndarray, p: np.ndarray) -> float:
    """``Σ_i (q_i − p_i)² / p_i`` over ``p_i > 0`` (``inf`` if ``q`` has mass where ``p`` has none)."""
    support = p > 0
    if np.any(q[~support] > 0):
        return math.inf
    return float(np.sum((q[support] - p[support]) ** 2 / p[support]))


def chi2_worst_case(losses: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray, rho: float) -> np.ndarray:
    """The exact maximiser ``q`` of ``Σ q_i L_i`` over ``{q ∈ simplex, Σ (q_i − p_i)²/p_i <= ρ}``.

    ``p`` is normalised; entries with ``p_i = 0`` get ``q_i = 0`` (their loss is ignored).
    """
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if losses.shape != p.shape:
        raise ValueError(f"losses {losses.shape} and p {p.shape} differ in shape")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    if np.any(p < 0) or not p.sum() > 0:
        raise ValueError(f"p must be non-negative with a positive sum, got {p.tolist()}")
    p = p / p.sum()
    support = p > 0
    q = np.zeros_like(p)
    ps, ls = p[support], losses[support]
    if not np.all(np.isfinite(ls)):
        raise ValueError(f"losses must be finite, got {losses.tolist()}")
    low, high = float(ls.min()), float(ls.max())
    if high - low <= 1e-12 * max(1.0, abs(high)):
        q[support] = ps
        return q
    mean = float(ps @ ls)
    variance = float(ps @ (ls - mean) ** 2)
    shift = mean - math.sqrt(variance / rho)
    if shift <= low:  # nobody is clipped: the closed form
        q[support] = ps * (ls - shift) / (mean - shift)
        return q
    top = ls >= high
    if 1.0 / float(ps[top].sum()) <= 1.0 + rho:  # the ball reaches the largest-loss vertex
        q[support] = np.where(top, ps, 0.0) / float(ps[top].sum())
        return q

    def ratio(c: float) -> float:
        excess = np.maximum(ls - c, 0.0)
        first = float(ps @ excess)
        return float(ps @ excess**2) / (first * first)

    for _ in range(200):  # f(low) < 1 + ρ < f(high⁻); f is non-decreasing
        middle = 0.5 * (low + high)
        if middle <= low or middle >= high:
            break
        if ratio(middle) <= 1.0 + rho:
            low = middle
        else:
            high = middle
    excess = np.maximum(ls - low, 0.0)
    q[support] = ps * excess / float(ps @ excess)
    return q


class ChiSquareDRO:
    """χ²-DRO task weights ``w_i = q_i / p_i`` (a loss-weighting balancer).

    ``ChiSquareDRO(tasks, probabilities, config=None, **overrides)``: ``probabilities`` is the
    sampling distribution ``p`` in task order (``SamplingSchedule.probabilities``);
    overrides are :class:`DROConfig` fields.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        probabilities: Sequence[float] | np.ndarray | Tensor,
        config: DROConfig | None = None,
        **overrides: Any,
    ):
        if not tasks:
            raise ValueError("DRO needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"DRO task names must be unique, got {list(tasks)}")
        base = (config or DROConfig()).model_dump()
        self.config = DROConfig.model_validate({**base, **overrides})
        self.tasks = list(tasks)
        k = len(self.tasks)
        p = np.asarray(torch.as_tensor(probabilities, dtype=torch.float64).cpu(), dtype=np.float64).reshape(-1)
        if p.shape != (k,) or np.any(p < 0) or not np.all(np.isfinite(p)) or not p.sum() > 0:
            raise ValueError(f"DRO needs {k} sampling probabilities >= 0 with a positive sum, got {p.tolist()}")
        self.probabilities = p / p.sum()
        self._q = self.probabilities.copy()
        self._loss_ema = np.zeros(k)
        self._seen = np.zeros(k, dtype=bool)
        self._steps = 0
        self._updates = 0
        self._skipped_nonfinite = 0

    @property
    def q(self) -> Tensor:
        """``[K]`` the current adversarial distribution (float64 copy)."""
        return torch.tensor(self._q, dtype=torch.float64)

    # ------------------------------------------------------------------ Balancer protocol

    def bind(self, context: BalancerContext) -> None:
        pass

    def plan(self, update: int) -> StepPlan:
        return StepPlan(task_gradients=False)

    def observe_validation(self, stats: TaskStats) -> None:
        raise ValueError("DRO never plans validation statistics")

    def loss_weights(self) -> Tensor:
        """``[K]`` float32 importance ratios ``q_i / p_i`` (0 where ``p_i = 0``)."""
        p = self.probabilities
        ratio = np.divide(self._q, p, out=np.zeros_like(p), where=p > 0)
        return torch.tensor(ratio, dtype=torch.float32)

    def observe_losses(self, losses: Tensor, tokens: Tensor) -> None:
        """Fold one step's per-task mean losses ``[K]`` (tasks with ``tokens > 0``) into the EMA and
        recompute ``q`` when the schedule selects this step."""
        k = len(self.tasks)
        values = torch.as_tensor(losses).detach().to("cpu", torch.float64).reshape(-1).numpy()
        present = torch.as_tensor(tokens).detach().to("cpu").reshape(-1).numpy() > 0
        if values.shape != (k,) or present.shape != (k,):
            raise ValueError(f"DRO expects losses and tokens of shape [{k}], got {values.shape} and {present.shape}")
        if not np.all(np.isfinite(values[present])):
            self._skipped_nonfinite += 1
        else:
            decay = self.config.ema_decay
            first = present & ~self._seen
            again = present & self._seen
            self._loss_ema[first] = values[first]
            self._loss_ema[again] = decay * self._loss_ema[again] + (1 - decay) * values[again]
            self._seen |= present
        cfg = self.config
        step = self._steps
        self._steps += 1
        if step >= cfg.warmup_steps and (step - cfg.warmup_steps) % cfg.update_every == 0:
            if np.all(self._seen[self.probabilities > 0]):
                self._q = chi2_worst_case(self._loss_ema, self.probabilities, cfg.rho)
                self._updates += 1

    def combine(self, stats: TaskStats) -> Tensor:
        """``wᵀ G`` with the current weights, then :meth:`observe_losses` of ``stats``."""
        if stats.grads is None:
            raise ValueError("DRO.combine needs per-task gradients (stats.grads is None)")
        direction = self.loss_weights().to(stats.grads) @ stats.grads
        self.observe_losses(stats.losses, stats.tokens)
        return direction

    def log_values(self) -> dict[str, float]:
        weights = self.loss_weights()
        values = {f"weight/{task}": float(w) for task, w in zip(self.tasks, weights)}
        values.update({f"dro_q/{task}": float(q) for task, q in zip(self.tasks, self._q)})
        values.update({f"dro_loss/{task}": float(v) for task, v, s in zip(self.tasks, self._loss_ema, self._seen) if s})
        values.update(
            {
                "dro/chi2": chi2_divergence(self._q, self.probabilities),
                "dro/updates": float(self._updates),
                "dro/skipped_nonfinite": float(self._skipped_nonfinite),
            }
        )
        if self._seen.all():
            values["dro/worst_case_loss"] = float(self._q @ self._loss_ema)
            values["dro/expected_loss"] = float(self.probabilities @ self._loss_ema)
        return values

    def state_dict(self) -> dict[str, Any]:
        """``q``, the loss EMA, counters and ``p`` (checked on load); ``weights_only`` safe."""
        return {
            "q": torch.tensor(self._q, dtype=torch.float64),
            "loss_ema": torch.tensor(self._loss_ema, dtype=torch.float64),
            "seen": torch.tensor(self._seen, dtype=torch.bool),
            "probabilities": torch.tensor(self.probabilities, dtype=torch.float64),
            "steps": self._steps,
            "updates": self._updates,
            "skipped_nonfinite": self._skipped_nonfinite,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.state_dict()) - set(state)
        if missing:
            raise ValueError(f"DRO state is missing {sorted(missing)}")
        k = len(self.tasks)
        for key in ("q", "loss_ema", "seen", "probabilities"):
            if tuple(state[key].shape) != (k,):
                raise ValueError(f"DRO state {key!r} has shape {tuple(state[key].shape)}, expected ({k},) for {self.tasks}")
        saved_p = state["probabilities"].detach().cpu().numpy().astype(np.float64)
        if not np.allclose(saved_p, self.probabilities, rtol=1e-9, atol=1e-12):
            raise ValueError(
                f"DRO state was built for sampling probabilities {saved_p.tolist()}, not "
                f"{self.probabilities.tolist()}; the sampling config changed"
            )
        self._q = state["q"].detach().cpu().numpy().astype(np.float64).copy()
        self._loss_ema = state["loss_ema"].detach().cpu().numpy().astype(np.float64).copy()
        self._seen = state["seen"].detach().cpu().numpy().astype(bool).copy()
        self._steps = int(state["steps"])
        self._updates = int(state["updates"])
        self._skipped_nonfinite = int(state["skipped_nonfinite"])
