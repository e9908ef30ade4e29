"""Gradient-combination peers through torchjd (pinned: ``torchjd==0.18.0``): PCGrad, MGDA, CAGrad,
NashMTL, UPGrad, GradDrop, IMTL-G and Aligned-MTL; what each does, the row scales
(``task_gradient``), state and what is logged: ``docs/peers.md``.

:class:`TorchJDBalancer` wraps one torchjd aggregator, built per set of tasks *present* in the
batch (absent tasks are left out, never fed as zero rows). It hands their rows of ``G`` to the
aggregator and returns the ``[P]`` direction; non-finite rows give the plain sum (or NaN), so the
trainer skips the step.

>>> import torch
>>> from polycats.balance import MGDAConfig, TaskStats, TorchJDBalancer
>>> mgda = TorchJDBalancer(["de-en", "sw-en"], MGDAConfig())
>>> grads = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
>>> d = mgda.combine(TaskStats(torch.ones(2), torch.tensor([5.0, 5.0]), grads))
>>> [round(float(x), 2) for x in d]  # the min-norm point of the segment [g_1, g_2]
[0.9, 0.3]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from polycats.balance.base import BalancerContext, GradientCombiner
from polycats.balancer_config import (
    AlignedMTLConfig, CAGradConfig, GradDropConfig, IMTLGConfig, MGDAConfig, NashMTLConfig, PCGradConfig, PeerConfig,
    TaskGradient, UPGradConfig,
)
from polycats.errors import PolycatsError
from polycats.ops.task_gradients import TaskStats, gram_matrix, weighted_sum

if TYPE_CHECKING:  # torchjd (and, through it, cvxpy) is imported only when a peer is built
    from torchjd.aggregation import Aggregator

TORCHJD_VERSION = "0.18.0"

def build_aggregator(config: PeerConfig, num_tasks: int, preference: Tensor | None) -> Aggregator:
    """The torchjd aggregator of ``config`` for ``num_tasks`` present tasks (``preference``: float64
    ``[num_tasks]`` summing to 1, or None)."""
    from torchjd import aggregation

    if isinstance(config, PCGradConfig):
        return aggregation.PCGrad()
    if isinstance(config, MGDAConfig):
        return aggregation.MGDA(epsilon=config.epsilon, max_iters=config.max_iters)
    if isinstance(config, CAGradConfig):
        return aggregation.CAGrad(c=config.c, norm_eps=config.norm_eps)
    if isinstance(config, NashMTLConfig):
        return aggregation.NashMTL(
            n_tasks=num_tasks,
            max_norm=config.max_norm,
            update_weights_every=config.update_weights_every,
            optim_niter=config.optim_niter,
        )
    if isinstance(config, UPGradConfig):
        from torchjd.linalg import QuadprogProjector

        return aggregation.UPGrad(
            pref_vector=preference, projector=QuadprogProjector(norm_eps=config.norm_eps, reg_eps=config.reg_eps)
        )
    if isinstance(config, GradDropConfig):
        leak = torch.full((num_tasks,), config.leak, dtype=torch.float32) if config.leak > 0 else None
        return aggregation.GradDrop(leak=leak)
    if isinstance(config, IMTLGConfig):
        return aggregation.IMTLG()
    if isinstance(config, AlignedMTLConfig):
        return aggregation.AlignedMTL(pref_vector=preference, scale_mode=config.scale_mode)
    raise TypeError(f"no torchjd aggregator for {type(config).__name__}")


_INSTALL = f'pip install "torchjd[quadprog-projector,cagrad,nash-mtl]=={TORCHJD_VERSION}"'


# ---------------------------------------------------------------------------- statistics


def pair_statistics(gram: Tensor) -> dict[str, float]:
    """Conflicts and cosines of the rows behind a float64 Gram matrix ``[m, m]``: ``conflicts``
    (pairs with ``g_i·g_j < 0``), ``pairs``, ``cos_min``, ``cos_mean`` (pairs of non-zero rows;
    1 when there are none)."""
    m = gram.shape[0]
    upper = torch.triu_indices(m, m, offset=1)
    dots = gram[upper[0], upper[1]]
    norms = gram.diagonal().clamp_min(0).sqrt()
    lengths = norms[upper[0]] * norms[upper[1]]
    valid = lengths > 0
    cosines = dots[valid] / lengths[valid]
    return {
        "conflicts": float((dots < 0).sum()),
        "pairs": float(dots.numel()),
        "cos_min": float(cosines.min()) if cosines.numel() else 1.0,
        "cos_mean": float(cosines.mean()) if cosines.numel() else 1.0,
    }


def fit_weights(rows: Tensor, gram: Tensor, direction: Tensor) -> tuple[Tensor, float]:
    """Least-squares weights ``w`` (float64) with ``wᵀ rows ≈ direction`` and the relative
    residual ``‖direction − wᵀ rows‖ / ‖direction‖`` (0 for a zero direction)."""
    target = (rows @ direction).to("cpu", torch.float64)
    weights = torch.linalg.pinv(gram, hermitian=True) @ target
    residual = direction - weighted_sum(weights, rows)
    norm = float(direction.norm())
    return weights, (float(residual.norm()) / norm if norm > 0 else 0.0)


# ---------------------------------------------------------------------------- the balancer


@dataclass
class PeerRecord:
    """What every gradient-combination peer logs and checkpoints: step and skip counters, the
    cumulative count of conflicting pairs, and the last step's weights and pair statistics."""

    steps: int = 0
    skipped_nonfinite: int = 0
    conflicts_total: int = 0
    pairs_total: int = 0
    last: dict[str, float] = field(default_factory=dict)
    last_weights: dict[str, float] = field(default_factory=dict)

    def record_absent(self) -> None:
        self.last, self.last_weights = {"tasks": 0.0}, {}

    def record(self, tasks: Sequence[str], index: Sequence[int], weights: Tensor, gram: Tensor,
               direction_sq: float, residual: float | None) -> None:
        """One combined step over the present tasks ``index`` (``gram``: their float64 Gram matrix)."""
        pairs = pair_statistics(gram)
        self.conflicts_total += int(pairs["conflicts"])
        self.pairs_total += int(pairs["pairs"])
        total_sq = float(gram.sum())
        self.last = {
            "tasks": float(len(index)),
            **pairs,
            "norm_ratio": math.sqrt(max(direction_sq, 0.0) / total_sq) if total_sq > 0 else 0.0,
        }
        if residual is not None:
            self.last["fit_residual"] = residual
        self.last_weights = {tasks[i]: float(w) for i, w in zip(index, weights)}

    def log_values(self) -> dict[str, float]:
        values = {f"weight/{task}": w for task, w in self.last_weights.items()}
        values.update({f"peer/{key}": value for key, value in self.last.items()})
        values.update({
            "peer/conflicts_total": float(self.conflicts_total),
            "peer/pairs_total": float(self.pairs_total),
            "peer/steps": float(self.steps),
            "peer/skipped_nonfinite": float(self.skipped_nonfinite),
        })
        return values

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "skipped_nonfinite": self.skipped_nonfinite,
                "conflicts_total": self.conflicts_total, "pairs_total": self.pairs_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.skipped_nonfinite = int(state["skipped_nonfinite"])
        self.conflicts_total = int(state["conflicts_total"])
        self.pairs_total = int(state["pairs_total"])


class TorchJDBalancer(GradientCombiner):
    """A torchjd aggregator as a balancer: ``combine`` gives the aggregation of the present tasks'
    gradient rows.

    ``TorchJDBalancer(tasks, config, preference=None)`` with ``config`` one of the ``*Config``
    classes here (an aggregator is built from it per set of present tasks), or with a ready
    torchjd ``Aggregator`` instance (used for every set; it must accept any number of rows) and
    ``task_gradient=`` as a keyword. ``preference``: per-task weights (UPGrad, AlignedMTL).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        config: PeerConfig | Aggregator,
        *,
        preference: Sequence[float] | None = None,
        task_gradient: TaskGradient | None = None,
    ):
        if not tasks:
            raise ValueError("a balancer needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique, got {list(tasks)}")
        self.tasks = list(tasks)
        k = len(self.tasks)
        if isinstance(config, PeerConfig):
            self.config: PeerConfig | None = config
            self.name = str(config.name)  # type: ignore[attr-defined]
            self.task_gradient: TaskGradient = task_gradient or config.task_gradient  # type: ignore[attr-defined]
            self._fixed: Aggregator | None = None
        else:
            self.config = None
            self.name = type(config).__name__.lower()
            self.task_gradient = task_gradient or "contribution"
            self._fixed = config
        if preference is not None:
            values = torch.as_tensor(list(preference), dtype=torch.float64)
            if values.shape != (k,) or bool((values < 0).any()) or not bool(values.sum() > 0):
                raise ValueError(f"preference must be {k} non-negative numbers, not all 0; got {list(preference)}")
            self.preference: Tensor | None = values
        else:
            self.preference = None
        self._aggregators: dict[tuple[int, ...], Aggregator] = {}
        self.record = PeerRecord()
        if self.config is not None:
            self._aggregator(tuple(range(k)))  # fail now on a missing optional dependency

    # ------------------------------------------------------------------ Balancer protocol

    def bind(self, context: BalancerContext) -> None:
        pass

    def combine(self, stats: TaskStats) -> Tensor:
        """The aggregation of the present tasks' rows of ``stats.grads`` ``[K, P]`` → ``[P]``."""
        grads = stats.grads
        if grads is None:
            raise ValueError(f"{self.name} needs per-task gradients (stats.grads is None)")
        k = len(self.tasks)
        if grads.ndim != 2 or grads.shape[0] != k:
            raise ValueError(f"{self.name} expects gradients [{k}, P], got {tuple(grads.shape)}")
        self.record.steps += 1
        index = tuple(int(i) for i in torch.nonzero(stats.present.cpu()).reshape(-1))
        if not index:
            self.record.record_absent()
            return torch.zeros_like(grads[0])
        rows = grads if len(index) == k else grads[list(index)]
        if not bool(torch.isfinite(rows).all()):
            self.record.skipped_nonfinite += 1
            return rows.sum(0)
        gram = gram_matrix(rows)
        if not bool(torch.isfinite(gram).all()):  # finite rows whose products overflow float32
            self.record.skipped_nonfinite += 1
            return torch.full_like(grads[0], math.nan)  # the trainer skips the update
        if self.task_gradient == "mean_loss":
            tokens = stats.tokens.detach().to("cpu", torch.float64)[list(index)]
            scale = tokens.sum() / tokens
        else:
            scale = torch.ones(len(index), dtype=torch.float64)
        if len(index) == 1 and isinstance(self.config, NashMTLConfig):
            # torchjd's NashMTL fails on one task (cvxpy: "Scalar operands are not allowed"). Its
            # answer there is known: α·(Gα) = 1 gives α = 1/‖g‖, a unit direction, then max_norm.
            norm = math.sqrt(float(gram[0, 0]))
            clip = self.config.max_norm if 0 < self.config.max_norm < 1 else 1.0
            weights = torch.tensor([clip / norm if norm > 0 else 0.0], dtype=torch.float64)
            direction, residual = None, None
        else:
            with warnings.catch_warnings():
                # cvxpy's note that NashMTL's problem is not DPP (re-canonicalised per solve): harmless
                warnings.filterwarnings("ignore", message=".*not DPP", category=UserWarning)
                weights, direction, residual = self._aggregate(self._aggregator(index), rows, gram, scale)
        weights = weights.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(weights).all()):  # a solver that failed on an extreme Gram matrix
            self.record.skipped_nonfinite += 1
            return torch.full_like(grads[0], math.nan)
        if direction is None:
            direction = weighted_sum(weights, rows)
            direction_sq = float(weights @ gram @ weights)
        else:
            direction_sq = float(direction.double().pow(2).sum())
        self.record.record(self.tasks, index, weights, gram, direction_sq, residual)
        return direction

    def log_values(self) -> dict[str, float]:
        return self.record.log_values()

    def state_dict(self) -> dict[str, Any]:
        """Counters, and NashMTL's solver state per set of present tasks (``weights_only`` safe)."""
        state: dict[str, Any] = {"name": self.name, **self.record.state_dict()}
        nash = {}
        for index, aggregator in self._aggregators.items():
            weighting = _nash_weighting(aggregator)
            if weighting is not None and weighting.step > 0:
                nash[",".join(map(str, index))] = {
                    "step": float(weighting.step),
                    # numpy dtypes kept (float32 before the first solve, float64 after): exact resume
                    "prvs_alpha": torch.from_numpy(np.array(weighting.prvs_alpha)),
                    "normalization_factor": torch.from_numpy(np.array(weighting.normalization_factor).reshape(1)),
                }
        state["nashmtl"] = nash
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"balancer state is for {state.get('name')!r}, not {self.name!r}")
        self.record.load_state_dict(state)
        for key, saved in state.get("nashmtl", {}).items():
            index = tuple(int(i) for i in key.split(","))
            if not index or max(index) >= len(self.tasks):
                raise ValueError(f"nashmtl state for tasks {key} does not fit {len(self.tasks)} tasks")
            weighting = _nash_weighting(self._aggregator(index))
            if weighting is None:
                raise ValueError(f"balancer state holds NashMTL state but this balancer is {self.name!r}")
            weighting.prvs_alpha = saved["prvs_alpha"].numpy().copy()
            weighting.normalization_factor = saved["normalization_factor"].numpy().copy()
            weighting.step = float(saved["step"])
            weighting._init_optim_problem()  # forward() builds it only at step 0

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _aggregate(
        aggregator: Aggregator, rows: Tensor, gram: Tensor, scale: Tensor
    ) -> tuple[Tensor, Tensor | None, float | None]:
        """Weights on ``rows`` (float64), and for a non-weighted aggregator its direction and the
        residual of the fitted weights. ``scale``: the row factors the aggregator sees."""
        from torchjd.aggregation import GramianWeightedAggregator, WeightedAggregator

        if isinstance(aggregator, GramianWeightedAggregator):
            return aggregator.gramian_weighting(gram * scale[:, None] * scale[None, :]) * scale, None, None
        scaled = rows * scale.to(rows)[:, None]
        if isinstance(aggregator, WeightedAggregator):
            return aggregator.weighting(scaled).detach().to("cpu", torch.float64) * scale, None, None
        direction = aggregator(scaled)
        weights, residual = fit_weights(rows, gram, direction)
        return weights, direction, residual

    def _aggregator(self, index: tuple[int, ...]) -> Aggregator:
        if self._fixed is not None:
            return self._fixed
        aggregator = self._aggregators.get(index)
        if aggregator is None:
            preference = None
            if self.preference is not None:
                chosen = self.preference[list(index)]
                total = float(chosen.sum())
                preference = chosen / total if total > 0 else torch.full_like(chosen, 1 / len(index))
            assert self.config is not None
            try:
                aggregator = build_aggregator(self.config, len(index), preference)
            except ImportError as error:
                raise PolycatsError(
                    f"balancer.name={self.name} needs an optional dependency of torchjd: {error}. "
                    f"Install them with: {_INSTALL}"
                ) from None
            self._aggregators[index] = aggregator
        return aggregator


def _nash_weighting(aggregator: Aggregator) -> Any:
    from torchjd.aggregation import NashMTL

    return aggregator.weighting if isinstance(aggregator, NashMTL) else None
