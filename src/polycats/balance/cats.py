"""CATS — Curvature Aware Task Scaling (Li & Gong, NeurIPS 2021); the reference is ``docs/cats.md``.

CATS learns one scale ``α_i`` per task and trains on ``Σ_i α_i S_i / N``, i.e. on the direction
``d = Σ_i α_i g_i`` (``g_i = ∇(S_i / N)``, so ``Σ_i g_i`` is the usual gradient). ``α`` starts at 1
(exactly the sampler's baseline) and lives in

    A = {α : α_i >= α_min, mean(α) = 1},

so the overall step size is unchanged and only the balance between tasks moves. Everything the
update needs is the ``[K]`` vector of mean task losses ``L`` and the ``[K, K]`` Gram matrix
``M = G Gᵀ`` (``M_ij = g_i · g_j``); nothing larger is kept between steps.

Formulation (scale-free form)
-----------------------------
Let ``e`` be an exponential moving average (decay ``ema_decay``, initialised with the first value)
of ``‖Σ_i g_i‖² = 1ᵀ M 1``, folded in on every training step (every ``observe`` for
``source="valid"``). The update works with ``M̃ = M / e`` (``M̃ = 0`` while ``e = 0``), so that the
step sizes do not depend on the model, and with the budget ``ε̃ = ρ`` (relative, default: the
absolute budget is ``ρ·e``) or ``ε̃ = epsilon / e`` when an absolute ``epsilon`` is configured.

``objective="lookahead"`` (default): the first-order decrease of all task losses after the step
is ``η 1ᵀ M α``; maximise it under the curvature budget::

    minimise_{α ∈ A}  −1ᵀ M̃ α     s.t.  c(α) <= ε̃          ∇ objective = −M̃ 1

Only ``M`` is needed. Alone (huge ``ε``) this linear objective puts all weight on the task with
the largest ``(M 1)_i``; with the budget binding, the optimum moves weight to tasks whose
gradients carry little of the total energy (the LoRes tasks, in the pre-study).

``objective="loss"`` (the weighted-loss reading of public reimplementations)::

    minimise_{α ∈ A}  Σ_i α_i L̃_i  s.t.  c(α) <= ε̃          ∇ objective = L̃

with ``L̃ = L / mean(|L|)`` over the tasks present (``L̃ = 0`` when all those losses are 0).
A linear objective over ``A`` has its optimum at a vertex and training reinforces it: this
variant collapses onto one task unless the constraint binds (see "Collapse" below).

The curvature constraint ``c(α) = αᵀ C α`` (``constraint``):

* ``combined`` (reference): ``C = M̃``, i.e. ``‖Σ_i α_i g_i‖² / e`` — under the Gauss–Newton /
  Fisher view ``H ≈ E[g gᵀ]`` the energy of the combined gradient bounds the curvature the step
  excites.
* ``per_task``: ``C = diag(M̃)``, i.e. ``Σ_i α_i² ‖g_i‖² / e`` (cross-task terms ignored).
* ``hvp`` (our extension): the measured curvature along the step,
  ``κ = dᵀ H d / ‖d‖²``, from ``curvature_probe(d)`` (one Hessian-vector product) at the
  direction ``d = Σ α_i g_i`` of the α in force when the update starts. The step's second-order
  loss change is ``η²/2 · dᵀHd = η²/2 · κ ‖d‖²``; ``combined`` assumes ``κ`` is the same for every
  step, ``hvp`` replaces that by the measurement relative to its running average:
  ``C = s · M̃`` with ``s = max(κ, 0) / κ̄`` and ``κ̄`` the EMA (decay ``ema_decay``) of
  ``max(κ, 0)`` including this probe. ``κ`` is a Rayleigh quotient, invariant to the scale of
  ``α``, and its α-gradient would need ``H d`` rather than the scalar, so ``s`` is held fixed
  through the inner steps of one update: the budget tightens when the step points into a
  sharper-than-usual region and loosens when it is flatter. With a constant curvature ``hvp``
  is exactly ``combined``. Non-positive ``κ`` (a locally concave direction) gives ``s = 0``.
  Without a probe (or, for ``update``/``step``, a ``curvature=`` value) the update raises
  :class:`CurvatureProbeMissing`.

Lagrangian ``J(α, λ) = f(α) + λ (c(α) − ε̃)`` with ``λ >= 0``. Each α update runs
``inner_steps`` alternating primal-dual steps::

    α ← Proj_A(α − η_α (∇f + 2 λ C α))             (projected, the reference)
    λ ← max(0, λ + η_λ (c(α) − ε̃))                 (with the α just computed)

``Proj_A`` is the exact Euclidean projection onto ``A``: ``α_i = max(v_i − τ, α_min)`` with the
shift ``τ`` found by sorting (the simplex projection of Duchi et al. 2008, shifted by ``α_min``),
not a clamp followed by renormalisation.

``parametrisation="softmax"``: ``α = α_min + (1 − α_min) · K · softmax(a)`` with unconstrained
logits ``a`` (``a = 0`` gives ``α = 1``) updated by plain gradient steps through that map,
``∇_a J_j = (α_j − α_min) (∇_α J_j − σᵀ ∇_α J)`` with ``σ = softmax`` over the present tasks.
The affine shift keeps ``mean(α) = 1`` and enforces the floor strictly (``α_min = 0`` gives the
plain ``K · softmax(a)``); the floor is approached only asymptotically, so "on the floor" means
within ``FLOOR_TOLERANCE`` of it.

Absent tasks and degenerate inputs
----------------------------------
Only the tasks present in the batch (``tokens > 0``) take part in an update; the others keep their
α, and the present tasks keep their sum (the projection is onto ``{α_P >= α_min, Σ α_P = const}``;
in softmax mode the present logits are re-shifted to keep their log-sum-exp), so ``mean(α) = 1``
still holds exactly and an absent task is neither rewarded nor punished for being absent. With
fewer than two tasks present (in particular ``K = 1``) there is nothing to balance: α stays as is.
Zero gradient rows need no special case. If ``L`` (present entries), ``M``, the energy or the probe
is not finite, the update is skipped and counted (``cats/skipped_nonfinite``); an update that would
produce a non-finite α or λ is reverted and counted the same way. α is never non-finite.

Schedule and where L and M come from
------------------------------------
``source="train"`` (default): ``combine(stats)`` receives this training step's per-task gradients
(in the trainer from one hooked pass, ``polycats.balance.task_split``; in a plain loop from
``backward_per_task``); on steps ``t >= warmup_steps`` with ``(t − warmup_steps) % update_every
== 0`` (``t`` = training steps seen before this one) it updates α from this batch's ``L`` and
``M`` *first* and then returns ``αᵀ G`` with the new α. On other steps α stays as is and only the
energy EMA moves. With ``update_every > 1`` the trainer asks ``task_gradients_now()`` and, after
warm-up, pays for per-task gradients only on α-update steps: the steps between are one backward pass
of ``Σ α_i S_i / N`` (the same direction), counted by ``observe_losses``, and the energy EMA moves
on update steps only. So the per-task cost is amortised over ``update_every`` steps.

``source="valid"``: α is updated from statistics on fixed validation batches, not from the
training batch. The trainer calls, before each training step with 0-based index ``update``::

    if cats.wants_valid_stats(update):                 # same warmup/update_every schedule
        cats.observe(per_task_gradients(params, valid_closures))   # L_i, g_i on valid batches
    ...train step with cats.loss_weights() (or combine, which then only applies αᵀG)...

In this mode ``needs_task_gradients`` is False: the training step is one ordinary backward pass of
``Σ α_i S_i / N``. ``observe(stats)`` can also be called in ``train`` mode: it is "update α now
from these statistics" without touching the step counter.

Gram sketch
-----------
``sketch_dim=None`` gives the exact ``M = G Gᵀ``. ``sketch_dim=m`` uses a seeded Gaussian
Johnson–Lindenstrauss projection ``R ∈ R^{m×P}`` with i.i.d. ``N(0, 1/m)`` entries (generated in
column chunks from ``sketch_seed`` on ``G``'s device, the same ``R`` on every call):
``M̂ = (G Rᵀ)(G Rᵀ)ᵀ``. ``M̂_ij`` is unbiased with variance ``(M_ij² + M_ii M_jj) / m <= 2
‖g_i‖² ‖g_j‖² / m``, and for ``0 < δ < 1``, with probability at least
``1 − 2 K (K+1) exp(−m (δ²/4 − δ³/6))``, every entry satisfies ``|M̂_ij − M_ij| <= δ ‖g_i‖ ‖g_j‖``
(Dasgupta–Gupta's JL tail for the unit vectors ``g_i/‖g_i‖ ± g_j/‖g_j‖``, then polarisation;
:func:`sketch_error_bound` inverts it: e.g. ``m = 256, K = 4`` gives ``δ ≈ 0.5`` at failure
probability 1e-3, while the typical error is ``sqrt(2/m) ≈ 0.09``). ``sketch(g)`` is linear
and row-wise, so a streaming gradient path may sketch each ``g_i`` as it is produced and keep only
``K × m`` numbers; ``‖Σ g_i‖²`` for the EMA is always computed exactly.

Observability
-------------
``log_values()``: ``alpha/<task>``, ``lambda``, ``cats/constraint`` (``c(α)`` at the last
update, scale-free), ``cats/epsilon`` (``ε̃``), ``cats/active`` (1 when ``λ > 0``: the constraint
binds), ``cats/grad_sq_ema`` (``e``), ``cats/updates``, ``cats/skipped_nonfinite``,
``cats/on_floor`` (tasks at the floor now), ``cats/floor_streak`` (longest current run of
consecutive updates some α sat on the floor), ``cats/floor_updates`` (updates with any α on the
floor, cumulative), ``cats/floor_warning`` (1 once some α has sat on the floor for
``floor_warn_steps`` consecutive updates) and, for ``hvp``, ``cats/curvature`` and
``cats/curvature_scale``.

Collapse
--------
With ``objective="loss"`` the pre-study saw the HiRes α hit the floor within 200 updates and all
weight end on one task. That must be visible: when some α has sat on the floor for
``floor_warn_steps`` consecutive updates, :class:`CatsCollapseWarning` is emitted (once per task
and episode) and ``cats/floor_warning`` is set.

Example
-------
A plain PyTorch loop (``backward_per_task`` leaves ``Σ α_i g_i`` in ``.grad``):

>>> import torch
>>> from torch import nn
>>> from polycats.balance.cats import CATS
>>> from polycats.balance.task_gradients import TaskLoss, backward_per_task
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
...     closures = [task(x, 33) for x in batches.values()]
...     stats = backward_per_task(model.parameters(), closures, cats)
...     optimizer.step()
>>> round(float(cats.alpha.mean()), 6)
1.0

The math alone, from losses and a Gram matrix (``step`` does the same on the warmup/update_every
schedule, ``update`` updates now):

>>> cats = CATS(["hi", "lo"], warmup_steps=0, lr_alpha=0.1)
>>> gram = torch.tensor([[9.0, 0.0], [0.0, 1.0]])
>>> for _ in range(300):
...     alpha = cats.update(torch.tensor([1.0, 1.0]), gram)
>>> bool(alpha[0] < 1.0 < alpha[1]), cats.lam > 0
(True, True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polycats.balance.base import TaskStats
from polycats.balance.task_gradients import gram_matrix, weighted_sum

FLOOR_TOLERANCE = 1e-3
"""An α within this distance of ``α_min`` counts as "on the floor" (α has mean 1)."""

_SKETCH_CHUNK_ELEMENTS = 1 << 22  # entries of R generated at a time (16 MiB in float32)


class CurvatureProbeMissing(RuntimeError):
    """``constraint="hvp"`` was asked to update α without a curvature measurement."""


class CatsCollapseWarning(UserWarning):
    """Some α has sat on the α_min floor for ``floor_warn_steps`` consecutive updates."""


class CatsConfig(BaseModel):
    """Options of CATS (``balancer.*`` in the YAML config when ``balancer.name: cats``)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["cats"] = "cats"
    objective: Literal["lookahead", "loss"] = Field(
        "lookahead", description="lookahead: maximise first-order decrease 1ᵀMα; loss: minimise Σ α_i L_i"
    )
    constraint: Literal["combined", "per_task", "hvp"] = Field(
        "combined", description="curvature proxy: ‖Σ α_i g_i‖², Σ α_i² ‖g_i‖², or HVP-measured"
    )
    source: Literal["train", "valid"] = Field(
        "train", description="where L and M come from: the training batch or fixed validation batches"
    )
    parametrisation: Literal["projected", "softmax"] = Field(
        "projected", description="projected steps on α, or α = α_min + (1-α_min)·K·softmax(a)"
    )
    lr_alpha: float = Field(0.01, gt=0, description="η_α, primal step size (scale-free units)")
    lr_lambda: float = Field(0.1, gt=0, description="η_λ, dual step size (scale-free units)")
    inner_steps: int = Field(5, ge=1, description="primal-dual steps per α update")
    rho: float = Field(0.5, gt=0, description="relative budget: ε = ρ · EMA(‖Σ g_i‖²)")
    epsilon: float | None = Field(None, gt=0, description="absolute budget ε; overrides rho when set")
    alpha_min: float = Field(0.05, ge=0, lt=1, description="floor of every α_i (mean(α) = 1)")
    update_every: int = Field(1, ge=1, description="update α every this many training steps")
    warmup_steps: int = Field(200, ge=0, description="keep α = 1 for this many training steps")
    ema_decay: float = Field(0.9, ge=0, lt=1, description="decay of the EMA of ‖Σ g_i‖² (and of κ)")
    sketch_dim: int | None = Field(None, ge=1, description="None: exact Gram; m: JL sketch of size m")
    sketch_seed: int = Field(0, ge=0, description="seed of the JL projection")
    floor_warn_steps: int = Field(
        100, ge=1, description="warn when an α sits on the floor this many consecutive updates"
    )


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


def _alpha_from_logits(logits: np.ndarray, alpha_min: float) -> np.ndarray:
    """The softmax parametrisation ``α = α_min + (1 − α_min) · K · softmax(a)``."""
    weights = np.exp(logits - logits.max())
    return alpha_min + (1 - alpha_min) * logits.size * weights / weights.sum()


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


class CATS:
    """Curvature Aware Task Scaling: learned per-task scales α of the task gradients.

    ``CATS(tasks, config=None, **overrides)``; overrides are :class:`CatsConfig` fields and are
    validated. See the module docstring for the formulation and the trainer hooks.
    """

    needs_task_gradients: bool = True

    def __init__(self, tasks: list[str], config: CatsConfig | None = None, **overrides: Any):
        if not tasks:
            raise ValueError("CATS needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"CATS task names must be unique, got {tasks}")
        base = (config or CatsConfig()).model_dump()
        self.config = CatsConfig.model_validate({**base, **overrides})
        self.tasks = list(tasks)
        self.needs_task_gradients = self.config.source == "train"
        # Set by the trainer for constraint="hvp": probe(d) -> dᵀHd / ‖d‖² for a flat direction d
        # (same layout and device as the gradient rows), on the batches the statistics come from.
        self.curvature_probe: Callable[[Tensor], float] | None = None
        k = len(self.tasks)
        self._alpha = np.ones(k)
        self._logits = np.zeros(k)
        self._lam = 0.0
        self._grad_sq_ema = 0.0
        self._grad_sq_count = 0
        self._curvature_ema = 0.0
        self._curvature_count = 0
        self._steps = 0
        self._updates = 0
        self._skipped_nonfinite = 0
        self._floor_streak = np.zeros(k, dtype=np.int64)
        self._floor_warned = np.zeros(k, dtype=np.int64)
        self._floor_updates = 0
        self._sketch_seed = self.config.sketch_seed
        self._last_constraint = 0.0
        self._last_epsilon = self._epsilon_scaled()
        self._last_curvature = 0.0
        self._last_curvature_scale = 1.0

    # ------------------------------------------------------------------ read-only state

    @property
    def alpha(self) -> Tensor:
        """``[K]`` current α (a float64 copy)."""
        return torch.tensor(self._alpha, dtype=torch.float64)

    @property
    def lam(self) -> float:
        """The Lagrange multiplier λ >= 0 of the curvature constraint."""
        return self._lam

    @property
    def steps(self) -> int:
        """Training steps seen by :meth:`combine` / :meth:`step`."""
        return self._steps

    # ------------------------------------------------------------------ Balancer protocol

    def loss_weights(self) -> Tensor:
        """α as ``[K]`` float32 weights on the task losses."""
        return torch.tensor(self._alpha, dtype=torch.float32)

    def combine(self, stats: TaskStats) -> Tensor:
        """The training direction ``αᵀ G``. With ``source="train"``, α is first updated from
        ``stats`` on the steps the schedule selects; with ``source="valid"`` α is only applied."""
        if stats.grads is None:
            raise ValueError("CATS.combine needs per-task gradients (stats.grads is None)")
        grads = stats.grads
        if self.config.source == "train":
            if self.is_update_step(self._steps):
                self.observe(stats)
            else:
                self._fold_energy(float(grads.sum(0).pow(2).sum()))
        self._steps += 1
        return self._direction(grads)

    def log_values(self) -> dict[str, float]:
        values = {f"alpha/{task}": float(a) for task, a in zip(self.tasks, self._alpha)}
        values.update(
            {
                "lambda": self._lam,
                "cats/constraint": self._last_constraint,
                "cats/epsilon": self._last_epsilon,
                "cats/active": 1.0 if self._lam > 0 else 0.0,
                "cats/grad_sq_ema": self._grad_sq_ema,
                "cats/updates": float(self._updates),
                "cats/skipped_nonfinite": float(self._skipped_nonfinite),
                "cats/on_floor": float(self._on_floor().sum()),
                "cats/floor_streak": float(self._floor_streak.max()),
                "cats/floor_updates": float(self._floor_updates),
                "cats/floor_warning": float(self._floor_streak.max() >= self.config.floor_warn_steps),
            }
        )
        if self.config.constraint == "hvp":
            values["cats/curvature"] = self._last_curvature
            values["cats/curvature_scale"] = self._last_curvature_scale
        return values

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain numbers only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "alpha": torch.tensor(self._alpha, dtype=torch.float64),
            "logits": torch.tensor(self._logits, dtype=torch.float64),
            "lambda": float(self._lam),
            "grad_sq_ema": float(self._grad_sq_ema),
            "grad_sq_count": int(self._grad_sq_count),
            "curvature_ema": float(self._curvature_ema),
            "curvature_count": int(self._curvature_count),
            "steps": int(self._steps),
            "updates": int(self._updates),
            "skipped_nonfinite": int(self._skipped_nonfinite),
            "floor_streak": torch.tensor(self._floor_streak, dtype=torch.int64),
            "floor_warned": torch.tensor(self._floor_warned, dtype=torch.int64),
            "floor_updates": int(self._floor_updates),
            "sketch_seed": int(self._sketch_seed),
            "last_constraint": float(self._last_constraint),
            "last_epsilon": float(self._last_epsilon),
            "last_curvature": float(self._last_curvature),
            "last_curvature_scale": float(self._last_curvature_scale),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.state_dict()) - set(state)
        if missing:
            raise ValueError(f"CATS state is missing {sorted(missing)}")
        k = len(self.tasks)
        for key in ("alpha", "logits", "floor_streak", "floor_warned"):
            if tuple(state[key].shape) != (k,):
                raise ValueError(
                    f"CATS state {key!r} has shape {tuple(state[key].shape)}, expected ({k},) "
                    f"for tasks {self.tasks}"
                )

        def array(key: str, dtype: type) -> np.ndarray:
            return state[key].detach().to("cpu").numpy().astype(dtype, copy=True)

        self._alpha = array("alpha", np.float64)
        self._logits = array("logits", np.float64)
        self._floor_streak = array("floor_streak", np.int64)
        self._floor_warned = array("floor_warned", np.int64)
        self._lam = float(state["lambda"])
        self._grad_sq_ema = float(state["grad_sq_ema"])
        self._grad_sq_count = int(state["grad_sq_count"])
        self._curvature_ema = float(state["curvature_ema"])
        self._curvature_count = int(state["curvature_count"])
        self._steps = int(state["steps"])
        self._updates = int(state["updates"])
        self._skipped_nonfinite = int(state["skipped_nonfinite"])
        self._floor_updates = int(state["floor_updates"])
        self._sketch_seed = int(state["sketch_seed"])
        self._last_constraint = float(state["last_constraint"])
        self._last_epsilon = float(state["last_epsilon"])
        self._last_curvature = float(state["last_curvature"])
        self._last_curvature_scale = float(state["last_curvature_scale"])

    # ------------------------------------------------------------------ trainer hooks

    def is_update_step(self, step: int) -> bool:
        """Whether α is updated on the training step with 0-based index ``step``."""
        cfg = self.config
        return step >= cfg.warmup_steps and (step - cfg.warmup_steps) % cfg.update_every == 0

    def task_gradients_now(self) -> bool:
        """Whether the coming training step needs per-task gradients: in warm-up (the energy EMA)
        and on α-update steps; the trainer runs one weighted backward pass on the others."""
        step = self._steps
        return self.needs_task_gradients and (step < self.config.warmup_steps or self.is_update_step(step))

    def observe_losses(self, losses: Tensor, tokens: Tensor) -> None:
        """A training step taken with one backward pass of ``Σ α_i S_i / N`` (see
        :meth:`task_gradients_now`): only counted, so the update schedule stays in step."""
        if self.config.source == "train":
            self._steps += 1

    def wants_valid_stats(self, update: int) -> bool:
        """``source="valid"``: whether the trainer should compute validation statistics and call
        :meth:`observe` before training step ``update`` (0-based). Always False for ``train``."""
        return self.config.source == "valid" and self.is_update_step(update)

    def observe(self, stats: TaskStats) -> Tensor:
        """Update α now from ``stats`` (losses, tokens, per-task gradients ``[K, P]``).

        For ``source="valid"`` these come from fixed validation batches. For ``hvp`` the probe is
        called with ``d = αᵀ G`` of these gradients (α before the update). Returns the new α.
        """
        if stats.grads is None:
            raise ValueError("CATS.observe needs per-task gradients (stats.grads is None)")
        grads = stats.grads
        curvature = self._probe(self._direction(grads)) if self.config.constraint == "hvp" else None
        gram = self.gram(grads)
        # ‖Σ g_i‖² = 1ᵀM1: read off the exact Gram matrix instead of another pass over G.
        energy = float(gram.sum()) if self.config.sketch_dim is None else float(grads.sum(0).pow(2).sum())
        return self._update(stats.losses, gram, energy, stats.present, curvature)

    def step(
        self,
        losses: Tensor,
        gram: Tensor,
        *,
        present: Tensor | None = None,
        curvature: float | None = None,
    ) -> Tensor:
        """One training step from ``L`` and the Gram matrix alone (library API): updates α when
        the warmup/update_every schedule selects this step, otherwise only folds ``1ᵀM1`` into
        the EMA. Returns the α to train with on this step."""
        if self.is_update_step(self._steps):
            alpha = self.update(losses, gram, present=present, curvature=curvature)
        else:
            self._fold_energy(float(gram.detach().double().sum()))
            alpha = self.alpha
        self._steps += 1
        return alpha

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
        if self.config.constraint == "hvp" and curvature is None:
            raise CurvatureProbeMissing(
                "cats.constraint=hvp needs the curvature dᵀHd/‖d‖² along the step: pass "
                "curvature= to CATS.update/step, or set cats.curvature_probe for combine/observe"
            )
        gram = gram.detach().to("cpu", torch.float64)
        return self._update(losses, gram, float(gram.sum()), present, curvature)

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
        return weighted_sum(torch.as_tensor(self._alpha), grads)

    def _epsilon_scaled(self) -> float:
        if self.config.epsilon is None:
            return self.config.rho
        if self._grad_sq_ema > 0:
            return self.config.epsilon / self._grad_sq_ema
        return math.inf  # no gradient energy seen yet: any absolute budget is slack

    def _fold_energy(self, energy: float) -> None:
        if not math.isfinite(energy):
            self._skipped_nonfinite += 1
            return
        if self._grad_sq_count == 0:
            self._grad_sq_ema = energy
        else:
            decay = self.config.ema_decay
            self._grad_sq_ema = decay * self._grad_sq_ema + (1 - decay) * energy
        self._grad_sq_count += 1

    def _probe(self, direction: Tensor) -> float:
        if self.curvature_probe is None:
            raise CurvatureProbeMissing(
                "cats.constraint=hvp needs a curvature probe: set cats.curvature_probe = "
                "fn(d) -> dᵀHd/‖d‖² (one Hessian-vector product on the current batch)"
            )
        return float(self.curvature_probe(direction.detach()))

    def _curvature_scale(self, curvature: float) -> float:
        """``s = max(κ, 0) / κ̄`` with ``κ̄`` the EMA of ``max(κ, 0)`` including this probe."""
        clipped = max(curvature, 0.0)
        if self._curvature_count == 0:
            self._curvature_ema = clipped
        else:
            decay = self.config.ema_decay
            self._curvature_ema = decay * self._curvature_ema + (1 - decay) * clipped
        self._curvature_count += 1
        self._last_curvature = curvature
        self._last_curvature_scale = clipped / self._curvature_ema if self._curvature_ema > 0 else 0.0
        return self._last_curvature_scale

    def _update(
        self,
        losses: Tensor,
        gram: Tensor,
        energy: float,
        present: Tensor | None,
        curvature: float | None,
    ) -> Tensor:
        k = len(self.tasks)
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
            return self.alpha
        self._fold_energy(energy)
        ema = self._grad_sq_ema
        scaled = gram_values[np.ix_(index, index)] / ema if ema > 0 else np.zeros((index.size, index.size))
        epsilon = self._epsilon_scaled()

        if self.config.constraint == "per_task":
            constraint = np.diag(np.diag(scaled))
        elif self.config.constraint == "hvp":
            assert curvature is not None
            constraint = self._curvature_scale(curvature) * scaled
        else:
            constraint = scaled
        if self.config.objective == "lookahead":
            objective_grad = -scaled.sum(1)  # −M̃1 (absent rows/columns of M are zero)
        else:
            chosen = loss_values[index]
            mean = float(np.abs(chosen).mean()) if index.size else 0.0
            objective_grad = chosen / mean if mean > 0 else np.zeros_like(chosen)

        if index.size >= 2:
            alpha, logits, lam = self._primal_dual(index, objective_grad, constraint, epsilon)
            if bool(np.isfinite(alpha).all()) and bool(np.isfinite(logits).all()) and math.isfinite(lam):
                self._alpha, self._logits, self._lam = alpha, logits, lam
            else:
                self._skipped_nonfinite += 1
        current = self._alpha[index]
        self._last_constraint = float(current @ constraint @ current)
        self._last_epsilon = epsilon
        self._updates += 1
        self._track_floor()
        return self.alpha

    def _primal_dual(
        self, index: np.ndarray, objective_grad: np.ndarray, constraint: np.ndarray, epsilon: float
    ) -> tuple[np.ndarray, np.ndarray, float]:
        cfg = self.config
        alpha = self._alpha.copy()
        logits = self._logits.copy()
        lam = self._lam
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
        return self._alpha <= self.config.alpha_min + FLOOR_TOLERANCE

    def _track_floor(self) -> None:
        on_floor = self._on_floor()
        self._floor_streak = np.where(on_floor, self._floor_streak + 1, 0)
        self._floor_warned = np.where(on_floor, self._floor_warned, 0)
        if on_floor.any():
            self._floor_updates += 1
        limit = self.config.floor_warn_steps
        for i, task in enumerate(self.tasks):
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
