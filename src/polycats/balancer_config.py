"""The options of every balancer (``balancer.*`` in the YAML config), without torch: the config
loads and validates before torch is imported. ``balancer`` is a union on ``balancer.name``;
:data:`BALANCER_NAMES` lists its choices in order, and ``polycats.balance.build_balancer`` turns
one into its balancer.

>>> BALANCER_NAMES[:3]
('scalar', 'cats', 'pcgrad')
>>> CatsConfig(objective="loss").constraint
'combined'
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field


class BalancerSection(BaseModel):
    # strict like the config's other sections: a number is a number, never true/false or a string
    # ("update_every: true" is not 1).
    model_config = ConfigDict(extra="forbid", strict=True)


class ScalarConfig(BalancerSection):
    """Per-language loss weights on the sampled batch (``balancer.name: scalar``, the default)."""

    name: Literal["scalar"] = "scalar"
    weights: dict[str, Annotated[float, Field(ge=0)]] | None = Field(None, description="per-language loss weights (default: all 1)")


class CatsConfig(BalancerSection):
    """Options of CATS (``balancer.*`` in the YAML config when ``balancer.name: cats``)."""

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
    rho: float = Field(
        0.5, gt=0, le=1, description="relative budget: ε = c_min + ρ (c(1) − c_min), from the least-energy α to α = 1"
    )
    epsilon: float | None = Field(None, gt=0, description="absolute budget ε; overrides rho when set")
    alpha_min: float = Field(0.05, ge=0, lt=1, description="floor of every α_i (mean(α) = 1)")
    update_every: int = Field(1, ge=1, description="update α every this many training steps")
    warmup_steps: int = Field(200, ge=0, description="keep α = 1 for this many training steps")
    ema_decay: float = Field(0.9, ge=0, lt=1, description="decay of the EMA of ‖Σ g_i‖² (and of κ)")
    gram_decay: float = Field(
        0.9, ge=0, lt=1, description="α updates use an EMA of the scale-free Gram matrix with this decay (0: the batch's)"
    )
    sketch_dim: int | None = Field(None, ge=1, description="None: exact Gram; m: JL sketch of size m")
    sketch_seed: int = Field(0, ge=0, description="seed of the JL projection")
    floor_warn_steps: int = Field(
        100, ge=1, description="warn when an α sits on the floor this many consecutive updates"
    )
    oscillation_warn: float = Field(
        0.2, gt=0, description="warn when α moves more than this per update (max over tasks, EMA over ~10 updates)"
    )
    valid_sentences: int = Field(
        64, ge=1, description="source=valid: sentences per task in the fixed, seeded validation sample"
    )


class DROConfig(BalancerSection):
    """Options of χ²-DRO (``balancer.*`` when ``balancer.name: dro``)."""

    name: Literal["dro"] = "dro"
    rho: float = Field(0.1, gt=0, description="radius of the χ² ball around the sampling distribution p")
    ema_decay: float = Field(0.9, ge=0, lt=1, description="decay of the EMA of each task's mean loss")
    warmup_steps: int = Field(0, ge=0, description="keep q = p (weights 1) for this many steps")
    update_every: int = Field(1, ge=1, description="recompute q every this many steps")


TaskGradient = Literal["contribution", "mean_loss"]


def task_gradient_field() -> Any:
    return Field(
        "contribution",
        description="rows given to the method: contribution ∇(S_i/N) (sampler mix kept) or mean_loss ∇L_i",
    )


class PeerConfig(BalancerSection):
    """Base of the torchjd peers' options (each has ``name`` first, then ``task_gradient``)."""


class PCGradConfig(PeerConfig):
    """PCGrad: each g_i is projected onto the normal plane of every g_j it conflicts with
    (random order), the projected rows are summed."""

    name: Literal["pcgrad"] = "pcgrad"
    task_gradient: TaskGradient = task_gradient_field()


class MGDAConfig(PeerConfig):
    """MGDA: the min-norm point of the convex hull of the rows (Frank–Wolfe)."""

    name: Literal["mgda"] = "mgda"
    task_gradient: TaskGradient = task_gradient_field()
    epsilon: float = Field(1e-3, gt=0, description="stop Frank–Wolfe when its step γ is below this")
    max_iters: int = Field(100, ge=1, description="Frank–Wolfe iterations at most")


class CAGradConfig(PeerConfig):
    """CAGrad: maximise the worst task's improvement within a ball of radius c·‖g_0‖ around the
    mean gradient g_0 (needs cvxpy + clarabel)."""

    name: Literal["cagrad"] = "cagrad"
    task_gradient: TaskGradient = task_gradient_field()
    c: float = Field(0.4, ge=0, description="radius scale of the ball around the mean gradient (0 = mean)")
    norm_eps: float = Field(1e-4, ge=0, description="below this the combined norm counts as 0 (Pareto stationary)")


class NashMTLConfig(PeerConfig):
    """Nash-MTL: the Nash bargaining solution Gᵀα with GGᵀα = 1/α (needs cvxpy + ecos)."""

    name: Literal["nashmtl"] = "nashmtl"
    task_gradient: TaskGradient = task_gradient_field()
    max_norm: float = Field(1.0, ge=0, description="clip ‖αᵀG‖ to this (0 = no clipping)")
    update_weights_every: int = Field(1, ge=1, description="solve for α every this many steps, reuse it between")
    optim_niter: int = Field(20, ge=1, description="sequential convex iterations per solve")


class UPGradConfig(PeerConfig):
    """UPGrad: project each row onto the dual cone of all rows, combine with the preference."""

    name: Literal["upgrad"] = "upgrad"
    task_gradient: TaskGradient = task_gradient_field()
    preference: dict[str, float] | None = Field(
        None, description="per-language preference (renormalised over present tasks); default: mean"
    )
    norm_eps: float = Field(1e-4, ge=0, description="quadprog projector: Gramian normalisation epsilon")
    reg_eps: float = Field(1e-4, ge=0, description="quadprog projector: added to the Gramian's diagonal")


class GradDropConfig(PeerConfig):
    """GradDrop: per coordinate, keep only the positive or only the negative components, drawn by
    their sign purity."""

    name: Literal["graddrop"] = "graddrop"
    task_gradient: TaskGradient = task_gradient_field()
    leak: float = Field(0.0, ge=0, le=1, description="share of every row that passes the sign mask unchanged")


class IMTLGConfig(PeerConfig):
    """IMTL-G: the combination whose projection onto every unit row is equal."""

    name: Literal["imtlg"] = "imtlg"
    task_gradient: TaskGradient = task_gradient_field()


class AlignedMTLConfig(PeerConfig):
    """Aligned-MTL: align the principal components of the rows (condition number 1), then
    combine with the preference."""

    name: Literal["alignedmtl"] = "alignedmtl"
    task_gradient: TaskGradient = task_gradient_field()
    preference: dict[str, float] | None = Field(
        None, description="per-language preference (renormalised over present tasks); default: mean"
    )
    scale_mode: Literal["min", "median", "rmse"] = Field(
        "min", description="eigenvalue that sets the scale: smallest, median, or mean (rmse, the original code)"
    )



PEER_CONFIGS: tuple[type[PeerConfig], ...] = (
    PCGradConfig,
    MGDAConfig,
    CAGradConfig,
    NashMTLConfig,
    UPGradConfig,
    GradDropConfig,
    IMTLGConfig,
    AlignedMTLConfig,
)


class GradVacConfig(BalancerSection):
    """Options of GradVac (``balancer.*`` when ``balancer.name: gradvac``)."""

    name: Literal["gradvac"] = "gradvac"
    task_gradient: TaskGradient = task_gradient_field()
    beta: float = Field(0.01, gt=0, le=1, description="EMA rate of the targets: φ̂ ← (1−β) φ̂ + β φ")
    grouping: Literal["whole_model", "per_tensor"] = Field(
        "whole_model", description="one target per task pair for the whole model, or per parameter tensor"
    )
    eps: float = Field(1e-8, ge=0, description="added to the denominators")


BalancerConfig = Annotated[
    ScalarConfig | CatsConfig | PCGradConfig | GradVacConfig | MGDAConfig | CAGradConfig | NashMTLConfig | UPGradConfig
    | GradDropConfig | IMTLGConfig | AlignedMTLConfig | DROConfig,
    Field(discriminator="name"),
]

BALANCER_NAMES: tuple[str, ...] = tuple(
    option.model_fields["name"].default for option in get_args(get_args(BalancerConfig)[0])
)
"""Every ``balancer.name``, in the order of the union (the CLI help, ``polycats.methods`` and the
benchmarks read it)."""
