"""CATS — Curvature Aware Task Scaling (Li & Gong, NeurIPS 2021); the formulation, options and
why: ``docs/cats.md``.

CATS keeps one scale ``α_i`` per task in ``{α : α_i >= α_min, mean(α) = 1}`` and trains on
``d = Σ_i α_i g_i``. :class:`CatsSolver` is the math: each α update reads only the ``[K]`` mean
task losses ``L`` and the ``[K, K]`` Gram matrix ``M`` of the per-task gradients and takes
primal-dual steps on ``min f(α) s.t. αᵀCα <= ε̃`` with a budget it can always reach; α, λ stay
finite whatever the input (non-finite statistics are skipped and counted). :class:`CATS` is the
balancer: the warm-up/``update_every`` schedule and where ``L`` and ``M`` come from.

>>> import torch
>>> from torch import nn
>>> from polycats.balance import CATS, TaskLoss, backward_per_task
>>> _ = torch.manual_seed(0)
>>> model = nn.Linear(4, 1)
>>> batches = {"de-en": torch.randn(30, 4), "sw-en": torch.randn(3, 4)}
>>> cats = CATS(list(batches), warmup_steps=0)
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
>>> def task(x, n_total):  # S_i / N with its graph, the mean token loss L_i, the tokens n_i
...     def run():
...         per_token = model(x).pow(2).sum(1)
...         return TaskLoss(per_token.sum() / n_total, float(per_token.detach().mean()), len(x))
...     return run
>>> for _ in range(3):
...     optimizer.zero_grad()
...     stats = backward_per_task(model.parameters(), [task(x, 33) for x in batches.values()], cats)
...     optimizer.step()
>>> round(float(cats.alpha.mean()), 6)
1.0
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polycats.balance.base import BalancerContext, StepPlan
from polycats.balancer_config import CatsConfig
from polycats.ops.task_gradients import TaskStats, gram_matrix, weighted_sum

FLOOR_TOLERANCE = 1e-3
"""An α within this distance of ``α_min`` counts as "on the floor" (α has mean 1)."""

_SKETCH_CHUNK_ELEMENTS = 1 << 22  # entries of R generated at a time (16 MiB in float32)
_MOVE_DECAY = 0.9  # EMA of how far α moves per update: an average over about ten updates
_MOVE_WINDOW = 10  # updates before the oscillation warning may fire


class CurvatureProbeMissing(RuntimeError):
    """``constraint="hvp"`` was asked to update α without a curvature measurement."""


class CatsCollapseWarning(UserWarning):
    """Some α has sat on the α_min floor for ``floor_warn_steps`` consecutive updates."""


class CatsOscillationWarning(UserWarning):
    """α moves more than ``oscillation_warn`` per update on average: it is not settling."""


class CatsBudgetWarning(UserWarning):
    """An absolute ``epsilon`` is below the least energy any α in the set can reach."""


def project_onto_floor_simplex(values: Tensor, floor: float, total: float) -> Tensor:
    """Exact Euclidean projection of ``values`` onto ``{x : x_i >= floor, Σ x_i = total}``.

    ``x_i = max(v_i − τ, floor)`` with the shift ``τ`` read off the sorted values (Duchi et al.
    2008 applied to ``v − floor``). Requires ``total >= len(values) · floor``.
    """
    array = values.detach().to("cpu", torch.float64).numpy()
    return torch.from_numpy(_project(array, floor, total)).to(values)


def _project(values: np.ndarray, floor: float, total: float) -> np.ndarray:
    k = values.size
    radius = total - k * floor
    if radius < -1e-9 * max(1.0, abs(total)):
        raise ValueError(f"infeasible projection: total {total} < {k} × floor {floor}")
    if radius <= 0:
        return np.full(k, floor, dtype=np.float64)
    shifted = values - floor
    ordered = np.sort(shifted)[::-1]
    cumulative = np.cumsum(ordered) - radius
    # True on a prefix; on the first entry too in exact arithmetic (radius > 0), so fall back to it
    # when rounding (a radius far below the values' precision) hides that.
    support = np.flatnonzero(ordered - cumulative / np.arange(1, k + 1) > 0)
    last = int(support[-1]) if support.size else 0
    tau = cumulative[last] / (last + 1)
    return np.maximum(shifted - tau, 0.0) + floor


def least_energy_weights(matrix: np.ndarray, floor: float, total: float) -> np.ndarray:
    """``argmin αᵀCα`` over ``{α : α_i >= floor, Σ α_i = total}`` for a symmetric PSD ``C``.

    A primal active-set method (Nocedal & Wright, Algorithm 16.3): exact up to round-off, at most
    a few ``(K+1)``-sized least-squares solves. Requires ``total >= K · floor``.

    >>> least_energy_weights(np.diag([4.0, 1.0]), 0.05, 2.0).round(6).tolist()
    [0.4, 1.6]
    """
    k = matrix.shape[0]
    alpha = np.full(k, total / k)
    if k == 1 or total - k * floor <= 1e-12 * max(1.0, abs(total)):
        return alpha
    at_floor = np.zeros(k, dtype=bool)
    scale = max(float(np.abs(matrix).max()), 1e-300) * max(1.0, abs(total))
    for _ in range(4 * k + 8):  # each pass adds or releases one bound; cycling is not expected
        free = np.flatnonzero(~at_floor)
        grad = 2 * matrix @ alpha
        # The best step p on the free coordinates that keeps Σα: 2 C_FF p + ν 1 = −∇_F, 1ᵀp = 0.
        n = free.size
        kkt = np.zeros((n + 1, n + 1))
        kkt[:n, :n] = 2 * matrix[np.ix_(free, free)]
        kkt[:n, n] = kkt[n, :n] = 1.0
        solution = np.linalg.lstsq(kkt, np.append(-grad[free], 0.0), rcond=None)[0]
        step = solution[:n]
        if np.abs(step).max() <= 1e-12 * max(1.0, abs(total)):
            # Stationary on the free set (∇_F = −ν 1): a bound whose multiplier ∇_i + ν is negative
            # would lower the energy if released.
            multipliers = np.where(at_floor, grad + solution[n], np.inf)
            worst = int(np.argmin(multipliers))
            if multipliers[worst] >= -1e-10 * scale:
                break
            at_floor[worst] = False
            continue
        length, blocking = 1.0, -1
        for position, index in enumerate(free):
            if step[position] < 0 and (floor - alpha[index]) / step[position] < length:
                length, blocking = (floor - alpha[index]) / step[position], index
        alpha[free] += length * step
        if blocking >= 0:
            alpha[blocking] = floor
            at_floor[blocking] = True
    return np.maximum(alpha, floor)


def _alpha_from_logits(logits: np.ndarray, alpha_min: float) -> np.ndarray:
    """The softmax parametrisation ``α = α_min + (1 − α_min) · K · softmax(a)``."""
    weights = np.exp(logits - logits.max())
    return alpha_min + (1 - alpha_min) * logits.size * weights / weights.sum()


def _debiased(raw: float, count: int, decay: float) -> float:
    """The bias-corrected value of an EMA started at 0 after ``count`` values (0 before any)."""
    return raw / (1 - decay**count) if count else 0.0


def _finite_losses(losses: Tensor, present: Tensor) -> bool:
    return bool(torch.isfinite(losses.detach().reshape(-1)[present.reshape(-1).bool()]).all())


def _logsumexp(values: np.ndarray) -> float:
    top = float(values.max())
    return top + math.log(float(np.exp(values - top).sum()))


def sketch_error_bound(sketch_dim: int, num_tasks: int, failure_probability: float = 1e-3) -> float:
    """Smallest ``δ < 1`` with ``2K(K+1)·exp(−m(δ²/4 − δ³/6)) <= failure_probability``.

    With at least that probability every sketched Gram entry satisfies
    ``|M̂_ij − M_ij| <= δ ‖g_i‖ ‖g_j‖`` (Dasgupta & Gupta's JL tail for the ``K(K+1)`` vectors
    ``g_i/‖g_i‖ ± g_j/‖g_j‖``, then polarisation). Returns ``inf`` if no ``δ < 1`` achieves it:
    use a larger ``sketch_dim``.
    """
    target = math.log(2 * num_tasks * (num_tasks + 1) / failure_probability) / sketch_dim

    def exponent(delta: float) -> float:
        return delta**2 / 4 - delta**3 / 6  # increasing on (0, 1)

    low, high = 0.0, 1.0
    if exponent(high) < target:
        return math.inf
    for _ in range(100):
        mid = (low + high) / 2
        if exponent(mid) >= target:
            high = mid
        else:
            low = mid
    return high


class CatsSolver:
    """The math of CATS on ``(L, M)`` alone: α in ``A``, the multiplier λ, the EMAs behind the
    scale-free Gram matrix and the reachable budget, and the collapse/oscillation/budget
    warnings. No schedule and no gradients: :class:`CATS` decides when to call :meth:`update`.

    >>> solver = CatsSolver(2, CatsConfig(lr_alpha=0.1))
    >>> for _ in range(300):
    ...     _ = solver.update(torch.tensor([1.0, 1.0]), torch.tensor([[9.0, 0.0], [0.0, 1.0]]), 10.0)
    >>> bool(solver.alpha[0] < 1.0 < solver.alpha[1]), solver.lam > 0
    (True, True)
    """

    def __init__(self, num_tasks: int, config: CatsConfig, task_names: list[str] | None = None):
        self.config = config
        self.task_names = task_names or [str(i) for i in range(num_tasks)]  # for warnings only
        k = num_tasks
        self.alpha = np.ones(k)
        self.logits = np.zeros(k)
        self.lam = 0.0
        self._grad_sq_ema = 0.0  # raw EMAs; read through _debiased
        self._grad_sq_count = 0
        self._curvature_ema = 0.0
        self._curvature_count = 0
        self._move_ema = 0.0
        self._move_count = 0
        self._gram_ema = np.zeros((k, k))
        self._gram_count = np.zeros((k, k), dtype=np.int64)
        self._oscillation_warned = 0
        self._budget_warned = 0
        self._updates = 0
        self._skipped_nonfinite = 0
        self._floor_streak = np.zeros(k, dtype=np.int64)
        self._floor_warned = np.zeros(k, dtype=np.int64)
        self._floor_updates = 0
        self._last_constraint = 0.0
        self._last_epsilon = 0.0
        self._last_least_energy = 0.0
        self._last_uniform_energy = 0.0
        self._last_curvature = 0.0
        self._last_curvature_scale = 1.0

    def fold_energy(self, energy: float) -> bool:
        """Fold ``‖Σ g_i‖²`` into ``e``; False (and counted as skipped) when it is not finite.
        A zero energy (a batch without gradient) says nothing about the scale and is left out."""
        if not math.isfinite(energy):
            self._skipped_nonfinite += 1
            return False
        if energy > 0:
            decay = self.config.ema_decay
            self._grad_sq_ema = decay * self._grad_sq_ema + (1 - decay) * energy
            self._grad_sq_count += 1
        return True

    def update(
        self,
        losses: Tensor,
        gram: Tensor,
        energy: float,
        present: Tensor | None = None,
        curvature: float | None = None,
    ) -> bool:
        """One α update from ``losses`` ``[K]``, ``gram`` ``[K, K]`` and ``energy`` ``= ‖Σ g_i‖²``;
        False (nothing changed but the skip count) if the input is not finite."""
        k = self.alpha.size
        loss_values = losses.detach().to("cpu", torch.float64).reshape(-1).numpy()
        gram_values = gram.detach().to("cpu", torch.float64).numpy()
        if loss_values.size != k or gram_values.shape != (k, k):
            raise ValueError(
                f"CATS expects losses [{k}] and gram [{k}, {k}], got {tuple(losses.shape)} and "
                f"{tuple(gram.shape)}"
            )
        if present is None:
            mask = np.ones(k, dtype=bool)
        else:
            mask = present.detach().to("cpu").reshape(-1).numpy().astype(bool)
            if mask.size != k:
                raise ValueError(f"CATS expects present [{k}], got {tuple(present.shape)}")
        index = np.flatnonzero(mask)
        finite = (
            math.isfinite(energy)
            and bool(np.isfinite(gram_values).all())
            and bool(np.isfinite(loss_values[index]).all())
            and (curvature is None or math.isfinite(curvature))
        )
        if not finite:
            self._skipped_nonfinite += 1
            return False
        self.fold_energy(energy)
        scale = self.energy_scale()
        scaled = self._smoothed_gram(index, gram_values / scale if scale > 0 else np.zeros((k, k)), energy > 0)
        constraint = np.diag(np.diag(scaled)) if self.config.constraint == "per_task" else scaled
        epsilon = self._budget(index, constraint, curvature)
        if self.config.objective == "lookahead":
            objective_grad = -scaled.sum(1)  # −M̃1 (absent rows/columns of M are zero)
        else:
            chosen = loss_values[index]
            mean = float(np.abs(chosen).mean()) if index.size else 0.0
            objective_grad = chosen / mean if mean > 0 else np.zeros_like(chosen)

        before = self.alpha.copy()
        if index.size >= 2:
            alpha, logits, lam = self._primal_dual(index, objective_grad, constraint, epsilon)
            if bool(np.isfinite(alpha).all()) and bool(np.isfinite(logits).all()) and math.isfinite(lam):
                self.alpha, self.logits, self.lam = alpha, logits, lam
            else:
                self._skipped_nonfinite += 1
        current = self.alpha[index]
        self._last_constraint = float(current @ constraint @ current)
        self._last_epsilon = epsilon
        self._updates += 1
        self._track_floor()
        self._track_movement(float(np.abs(self.alpha - before).max()))
        return True

    def energy_scale(self) -> float:
        """``e``: the bias-corrected EMA of the positive ``‖Σ g_i‖²`` seen (0 before any)."""
        return _debiased(self._grad_sq_ema, self._grad_sq_count, self.config.ema_decay)

    def log_values(self) -> dict[str, float]:
        values = {
            "lambda": self.lam,
            "cats/constraint": self._last_constraint,
            "cats/epsilon": self._last_epsilon,
            "cats/active": 1.0 if self.lam > 0 else 0.0,
            "cats/least_energy": self._last_least_energy,
            "cats/uniform_energy": self._last_uniform_energy,
            "cats/grad_sq_ema": self.energy_scale(),
            "cats/updates": float(self._updates),
            "cats/skipped_nonfinite": float(self._skipped_nonfinite),
            "cats/on_floor": float(self._on_floor().sum()),
            "cats/floor_streak": float(self._floor_streak.max()),
            "cats/floor_updates": float(self._floor_updates),
            "cats/floor_warning": float(self._floor_streak.max() >= self.config.floor_warn_steps),
            "cats/alpha_move": self._alpha_move(),
            "cats/oscillation_warning": float(self._alpha_move() > self.config.oscillation_warn),
        }
        if self.config.constraint == "hvp":
            values["cats/curvature"] = self._last_curvature
            values["cats/curvature_scale"] = self._last_curvature_scale
        return values

    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": torch.tensor(self.alpha, dtype=torch.float64),
            "logits": torch.tensor(self.logits, dtype=torch.float64),
            "lambda": float(self.lam),
            "grad_sq_ema": float(self._grad_sq_ema),
            "grad_sq_count": int(self._grad_sq_count),
            "curvature_ema": float(self._curvature_ema),
            "curvature_count": int(self._curvature_count),
            "gram_ema": torch.tensor(self._gram_ema, dtype=torch.float64),
            "gram_count": torch.tensor(self._gram_count, dtype=torch.int64),
            "move_ema": float(self._move_ema),
            "move_count": int(self._move_count),
            "oscillation_warned": int(self._oscillation_warned),
            "budget_warned": int(self._budget_warned),
            "updates": int(self._updates),
            "skipped_nonfinite": int(self._skipped_nonfinite),
            "floor_streak": torch.tensor(self._floor_streak, dtype=torch.int64),
            "floor_warned": torch.tensor(self._floor_warned, dtype=torch.int64),
            "floor_updates": int(self._floor_updates),
            "last_constraint": float(self._last_constraint),
            "last_epsilon": float(self._last_epsilon),
            "last_least_energy": float(self._last_least_energy),
            "last_uniform_energy": float(self._last_uniform_energy),
            "last_curvature": float(self._last_curvature),
            "last_curvature_scale": float(self._last_curvature_scale),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Shapes are checked by :meth:`CATS.load_state_dict`."""

        def array(key: str, dtype: type) -> np.ndarray:
            return state[key].detach().to("cpu").numpy().astype(dtype, copy=True)

        self.alpha = array("alpha", np.float64)
        self.logits = array("logits", np.float64)
        self._floor_streak = array("floor_streak", np.int64)
        self._floor_warned = array("floor_warned", np.int64)
        self.lam = float(state["lambda"])
        self._grad_sq_ema = float(state["grad_sq_ema"])
        self._grad_sq_count = int(state["grad_sq_count"])
        self._curvature_ema = float(state["curvature_ema"])
        self._curvature_count = int(state["curvature_count"])
        self._gram_ema = array("gram_ema", np.float64)
        self._gram_count = array("gram_count", np.int64)
        self._move_ema = float(state["move_ema"])
        self._move_count = int(state["move_count"])
        self._oscillation_warned = int(state["oscillation_warned"])
        self._budget_warned = int(state["budget_warned"])
        self._updates = int(state["updates"])
        self._skipped_nonfinite = int(state["skipped_nonfinite"])
        self._floor_updates = int(state["floor_updates"])
        self._last_constraint = float(state["last_constraint"])
        self._last_epsilon = float(state["last_epsilon"])
        self._last_least_energy = float(state["last_least_energy"])
        self._last_uniform_energy = float(state["last_uniform_energy"])
        self._last_curvature = float(state["last_curvature"])
        self._last_curvature_scale = float(state["last_curvature_scale"])

    # ------------------------------------------------------------------ internals

    def _alpha_move(self) -> float:
        return _debiased(self._move_ema, self._move_count, _MOVE_DECAY)

    def _curvature_scale(self, curvature: float) -> float:
        """``s = max(κ, 0) / κ̄`` with ``κ̄`` the EMA of ``max(κ, 0)`` including this probe."""
        clipped = max(curvature, 0.0)
        decay = self.config.ema_decay
        self._curvature_ema = decay * self._curvature_ema + (1 - decay) * clipped
        self._curvature_count += 1
        average = _debiased(self._curvature_ema, self._curvature_count, decay)
        self._last_curvature = curvature
        self._last_curvature_scale = clipped / average if average > 0 else 0.0
        return self._last_curvature_scale

    def _smoothed_gram(self, index: np.ndarray, scaled: np.ndarray, informative: bool) -> np.ndarray:
        """The present block of ``M̃``, averaged over updates when ``gram_decay > 0``: a per-entry
        bias-corrected EMA over the updates in which both tasks of the entry were present and
        the batch had gradient energy (``informative``)."""
        decay = self.config.gram_decay
        block = np.ix_(index, index)
        if decay == 0:
            return scaled[block]
        if informative:
            self._gram_ema[block] = decay * self._gram_ema[block] + (1 - decay) * scaled[block]
            self._gram_count[block] += 1
        counts = self._gram_count[block]
        return np.where(counts > 0, self._gram_ema[block] / (1 - decay ** np.maximum(counts, 1)), scaled[block])

    def _budget(self, index: np.ndarray, constraint: np.ndarray, curvature: float | None) -> float:
        """``ε̃`` for this update, in the units of ``c(α) = αᵀCα`` over the present tasks.

        Relative (default): ``c_min + ρ (c_1 − c_min)``, where ``c_min`` is the least ``c`` any
        α of the set can reach (the present tasks keeping their sum) and ``c_1`` that of equal
        weights, so the budget is always reachable. ``hvp`` divides ρ by the curvature scale
        ``s`` (capped at 1: never looser than equal weights). Absolute: ``epsilon / e`` (``/ s``
        for ``hvp``), with a :class:`CatsBudgetWarning` when it is below ``c_min``.
        """
        cfg = self.config
        total = float(self.alpha[index].sum())
        least = least_energy_weights(constraint, cfg.alpha_min, total) if index.size else np.zeros(0)
        uniform = np.full(index.size, total / max(index.size, 1))
        self._last_least_energy = float(least @ constraint @ least)
        self._last_uniform_energy = float(uniform @ constraint @ uniform)
        sharpness = 1.0
        if cfg.constraint == "hvp":
            assert curvature is not None
            sharpness = self._curvature_scale(curvature)
        if cfg.epsilon is None:
            rho = min(cfg.rho / sharpness, 1.0) if sharpness > 0 else 1.0
            return self._last_least_energy + rho * (self._last_uniform_energy - self._last_least_energy)
        scale = self.energy_scale()
        epsilon = cfg.epsilon / (scale * sharpness) if scale * sharpness > 0 else math.inf
        if epsilon < self._last_least_energy and index.size >= 2 and not self._budget_warned:
            self._budget_warned = 1
            warnings.warn(
                f"CATS: the absolute budget epsilon={cfg.epsilon:g} is below the least curvature energy any "
                f"alpha can reach ({self._last_least_energy * scale:.4g} on this batch): lambda will grow "
                "without bound; use the relative budget (unset epsilon, set rho in (0, 1])",
                CatsBudgetWarning,
                stacklevel=4,
            )
        return epsilon

    def _track_movement(self, move: float) -> None:
        self._move_ema = _MOVE_DECAY * self._move_ema + (1 - _MOVE_DECAY) * move
        self._move_count += 1
        limit = self.config.oscillation_warn
        average = self._alpha_move()
        if average < limit / 2:
            self._oscillation_warned = 0
        elif average > limit and self._move_count >= _MOVE_WINDOW and not self._oscillation_warned:
            self._oscillation_warned = 1
            warnings.warn(
                f"CATS: alpha moves {average:.3g} per update on average (> oscillation_warn={limit:g}): it is "
                "oscillating rather than settling; lower lr_alpha / lr_lambda (docs/cats.md)",
                CatsOscillationWarning,
                stacklevel=4,
            )

    def _primal_dual(
        self, index: np.ndarray, objective_grad: np.ndarray, constraint: np.ndarray, epsilon: float
    ) -> tuple[np.ndarray, np.ndarray, float]:
        cfg = self.config
        alpha = self.alpha.copy()
        logits = self.logits.copy()
        lam = self.lam
        current = alpha[index]
        total = float(current.sum())
        softmax = cfg.parametrisation == "softmax"
        for _ in range(cfg.inner_steps):
            grad = objective_grad + 2 * lam * (constraint @ current)
            if softmax:
                z = logits[index]
                weights = np.exp(z - z.max())
                weights /= weights.sum()
                moved = z - cfg.lr_alpha * (current - cfg.alpha_min) * (grad - weights @ grad)
                # Keep the present tasks' softmax mass (so absent tasks' α) unchanged.
                logits[index] = moved + (_logsumexp(z) - _logsumexp(moved))
                alpha = _alpha_from_logits(logits, cfg.alpha_min)
                current = alpha[index]
            else:
                current = _project(current - cfg.lr_alpha * grad, cfg.alpha_min, total)
            value = float(current @ constraint @ current)
            lam = max(0.0, lam + cfg.lr_lambda * (value - epsilon))
        if not softmax:
            alpha[index] = current
        return alpha, logits, lam

    def _on_floor(self) -> np.ndarray:
        return self.alpha <= self.config.alpha_min + FLOOR_TOLERANCE

    def _track_floor(self) -> None:
        on_floor = self._on_floor()
        self._floor_streak = np.where(on_floor, self._floor_streak + 1, 0)
        self._floor_warned = np.where(on_floor, self._floor_warned, 0)
        if on_floor.any():
            self._floor_updates += 1
        limit = self.config.floor_warn_steps
        for i, task in enumerate(self.task_names):
            if self._floor_streak[i] >= limit and not self._floor_warned[i]:
                self._floor_warned[i] = 1
                warnings.warn(
                    f"CATS: alpha/{task} has sat on the floor alpha_min={self.config.alpha_min} "
                    f"for {int(self._floor_streak[i])} consecutive updates: the weighting has "
                    f"collapsed and this task is effectively not trained (objective="
                    f"{self.config.objective!r}; the 'loss' objective is prone to this, see "
                    f"docs/cats.md)",
                    CatsCollapseWarning,
                    stacklevel=3,
                )


class CATS:
    """Curvature Aware Task Scaling as a balancer: :class:`CatsSolver` on the warm-up /
    ``update_every`` schedule, fed from per-task gradients (``source="train"``) or from the fixed
    validation sample (``source="valid"``).

    ``CATS(tasks, config=None, **overrides)``; overrides are :class:`CatsConfig` fields and are
    validated. The formulation and options: ``docs/cats.md``.
    """

    def __init__(self, tasks: list[str], config: CatsConfig | None = None, **overrides: Any):
        if not tasks:
            raise ValueError("CATS needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"CATS task names must be unique, got {tasks}")
        base = (config or CatsConfig()).model_dump()
        self.config = CatsConfig.model_validate({**base, **overrides})
        self.tasks = list(tasks)
        self.solver = CatsSolver(len(self.tasks), self.config, self.tasks)
        self._steps = 0
        self._sketch_seed = self.config.sketch_seed

    @property
    def alpha(self) -> Tensor:
        """``[K]`` current α (a float64 copy)."""
        return torch.tensor(self.solver.alpha, dtype=torch.float64)

    @property
    def lam(self) -> float:
        """The Lagrange multiplier λ >= 0 of the curvature constraint."""
        return self.solver.lam

    @property
    def steps(self) -> int:
        """Training steps counted by the schedule (steps with non-finite statistics are not)."""
        return self._steps

    def is_update_step(self, step: int) -> bool:
        """Whether α is updated on the training step with 0-based index ``step``."""
        cfg = self.config
        return step >= cfg.warmup_steps and (step - cfg.warmup_steps) % cfg.update_every == 0

    # ------------------------------------------------------------------ Balancer protocol

    def bind(self, context: BalancerContext) -> None:
        pass

    def plan(self, update: int) -> StepPlan:
        """``source="train"``: per-task gradients in warm-up (the energy EMA) and on α-update
        steps, one loss-weighted pass between. ``source="valid"``: validation statistics on the
        α-update steps (counted in the trainer's ``update``s), every step loss-weighted. The
        curvature probe (``hvp``) on the α-update steps."""
        hvp = self.config.constraint == "hvp"
        if self.config.source == "valid":
            now = self.is_update_step(update)
            return StepPlan(task_gradients=False, validation=now, curvature=hvp and now)
        step = self._steps
        now = self.is_update_step(step)
        return StepPlan(task_gradients=step < self.config.warmup_steps or now, curvature=hvp and now)

    def observe_validation(self, stats: TaskStats) -> None:
        """Update α now from validation statistics (losses, tokens, per-task gradients ``[K, P]``;
        for ``hvp`` the probe is called with ``d = αᵀ G``, α before the update)."""
        self._observe(stats)

    def combine(self, stats: TaskStats) -> Tensor:
        """The training direction ``αᵀ G``. With ``source="train"``, α is first updated from
        ``stats`` on the steps the schedule selects; with ``source="valid"`` α is only applied."""
        if stats.grads is None:
            raise ValueError("CATS.combine needs per-task gradients (stats.grads is None)")
        grads = stats.grads
        finite = True
        if self.config.source == "train":
            if self.is_update_step(self._steps):
                finite = self._observe(stats)
            else:
                finite = _finite_losses(stats.losses, stats.present) and self.solver.fold_energy(
                    float(grads.sum(0).pow(2).sum())
                )
        # A step with non-finite statistics is skipped by the trainer too: not counting it keeps
        # the warm-up/update_every schedule on the trainer's update count.
        self._steps += int(finite)
        return self._direction(grads)

    def loss_weights(self) -> Tensor:
        """α as ``[K]`` float32 weights on the task losses."""
        return torch.tensor(self.solver.alpha, dtype=torch.float32)

    def observe_losses(self, losses: Tensor, tokens: Tensor) -> None:
        """A step taken with one backward pass of ``Σ α_i S_i / N``: only counted, so the
        update schedule stays in step."""
        if self.config.source == "train" and _finite_losses(losses, tokens > 0):
            self._steps += 1

    def log_values(self) -> dict[str, float]:
        return {**{f"alpha/{task}": float(a) for task, a in zip(self.tasks, self.solver.alpha)}, **self.solver.log_values()}

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain numbers only (loads with ``torch.load(weights_only=True)``)."""
        return {**self.solver.state_dict(), "steps": int(self._steps), "sketch_seed": int(self._sketch_seed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.state_dict()) - set(state)
        if missing:
            raise ValueError(
                f"CATS state is missing {sorted(missing)} (written by an older polycats, before the reachable "
                "curvature budget): train that run again"
            )
        k = len(self.tasks)
        for key in ("alpha", "logits", "floor_streak", "floor_warned"):
            if tuple(state[key].shape) != (k,):
                raise ValueError(
                    f"CATS state {key!r} has shape {tuple(state[key].shape)}, expected ({k},) "
                    f"for tasks {self.tasks}"
                )
        for key in ("gram_ema", "gram_count"):
            if tuple(state[key].shape) != (k, k):
                raise ValueError(f"CATS state {key!r} has shape {tuple(state[key].shape)}, expected ({k}, {k})")
        self.solver.load_state_dict(state)
        self._steps = int(state["steps"])
        self._sketch_seed = int(state["sketch_seed"])

    # ------------------------------------------------------------------ library API

    def step(
        self,
        losses: Tensor,
        gram: Tensor,
        *,
        present: Tensor | None = None,
        curvature: float | None = None,
    ) -> Tensor:
        """One training step from ``L`` and the Gram matrix alone: updates α when the
        warmup/update_every schedule selects this step, otherwise only folds ``1ᵀM1`` into the
        EMA. Returns the α to train with on this step."""
        if self.is_update_step(self._steps):
            finite = self._update_now(losses, gram, present, curvature)
        else:
            mask = torch.ones(len(self.tasks), dtype=torch.bool) if present is None else present
            finite = _finite_losses(losses, mask) and self.solver.fold_energy(float(gram.detach().double().sum()))
        self._steps += int(finite)
        return self.alpha

    def update(
        self,
        losses: Tensor,
        gram: Tensor,
        *,
        present: Tensor | None = None,
        curvature: float | None = None,
    ) -> Tensor:
        """One α update now, ignoring the schedule, from ``losses`` ``[K]`` and ``gram``
        ``[K, K]``: folds ``1ᵀ gram 1`` into the EMA, then ``inner_steps`` primal-dual steps.

        ``present`` (bool ``[K]``, default all) marks the tasks that take part; ``curvature`` is
        ``κ = dᵀHd/‖d‖²`` along the current direction, required for ``constraint="hvp"``.
        Returns the new α.
        """
        self._update_now(losses, gram, present, curvature)
        return self.alpha

    def gram(self, grads: Tensor) -> Tensor:
        """``[K, K]`` Gram matrix (float64, CPU) of the rows of ``grads``: exact or sketched."""
        if self.config.sketch_dim is None:
            return gram_matrix(grads)
        sketched = self.sketch(grads)
        return (sketched @ sketched.T).to("cpu", torch.float64)

    def sketch(self, grads: Tensor) -> Tensor:
        """``G Rᵀ`` (float64): the seeded JL projection of rows ``[K, P]`` (or one ``[P]``
        vector) to ``sketch_dim`` numbers each. Linear and row-wise; the same ``R`` on every call
        for a given seed, ``P`` and device type."""
        m = self.config.sketch_dim
        if m is None:
            raise ValueError("CATS.sketch needs cats.sketch_dim to be set")
        rows = grads.detach().reshape(-1, grads.shape[-1])
        size = rows.shape[1]
        generator = torch.Generator(device=rows.device)
        generator.manual_seed(self._sketch_seed)
        chunk = max(1, _SKETCH_CHUNK_ELEMENTS // m)
        out = torch.zeros(rows.shape[0], m, dtype=torch.float64, device=rows.device)
        for start in range(0, size, chunk):
            width = min(chunk, size - start)
            block = torch.randn(m, width, generator=generator, device=rows.device, dtype=rows.dtype)
            out += (rows[:, start : start + width] @ block.T).to(torch.float64)
        out /= math.sqrt(m)
        return out.reshape(*grads.shape[:-1], m)

    # ------------------------------------------------------------------ internals

    def _direction(self, grads: Tensor) -> Tensor:
        return weighted_sum(torch.as_tensor(self.solver.alpha), grads)

    def _observe(self, stats: TaskStats) -> bool:
        if stats.grads is None:
            raise ValueError("CATS needs per-task gradients to update α (stats.grads is None)")
        grads = stats.grads
        curvature = None
        if self.config.constraint == "hvp":
            if stats.curvature is None:
                raise CurvatureProbeMissing(
                    "cats.constraint=hvp needs a curvature probe: TaskStats(curvature=fn) with "
                    "fn(d) -> dᵀHd/‖d‖² (one Hessian-vector product on the batches of the statistics)"
                )
            curvature = float(stats.curvature(self._direction(grads).detach()))
        gram = self.gram(grads)
        # ‖Σ g_i‖² = 1ᵀM1: read off the exact Gram matrix instead of another pass over G.
        energy = float(gram.sum()) if self.config.sketch_dim is None else float(grads.sum(0).pow(2).sum())
        return self.solver.update(stats.losses, gram, energy, stats.present, curvature)

    def _update_now(self, losses: Tensor, gram: Tensor, present: Tensor | None, curvature: float | None) -> bool:
        if self.config.constraint == "hvp" and curvature is None:
            raise CurvatureProbeMissing(
                "cats.constraint=hvp needs the curvature dᵀHd/‖d‖² along the step: pass curvature= to "
                "CATS.update/step, or TaskStats(curvature=fn) to combine/observe_validation"
            )
        gram = gram.detach().to("cpu", torch.float64)
        return self.solver.update(losses, gram, float(gram.sum()), present, curvature)
