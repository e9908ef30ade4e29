"""Gradient similarity and curvature of one model on fixed, seeded training batches: the numbers
``polycats analyze`` writes per checkpoint and the trainer logs every ``train.diagnostics_every``
updates (docs/diagnostics.md).

The batches: ``sentences`` training sentences per task, drawn once with a fixed seed, so the
numbers of different checkpoints and different runs of the same data are comparable. The combined
loss is the one the trainer optimises in expectation: task ``i`` weighted by its sampling
probability ``p_i`` times the balancer's loss weight (α for CATS), i.e. ``w_i = K p_i α_i`` on
batches with one equal share per task.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from polycats.data.batching import sample_batch
from polycats.data.prepare import PAD, PreparedData
from polycats.diagnostics.curvature import ExtremeEigenvalues, curvature_report
from polycats.diagnostics.gradients import gradient_similarity
from polycats.model.transformer import Transformer
from polycats.ops.losses import LossClosure, translation_loss


class DiagnosticsNotConvergedWarning(UserWarning):
    """An eigenvalue solve used its whole budget of Hessian-vector products before meeting its
    tolerance: the reported value is its last estimate."""


@dataclass(frozen=True)
class DiagnosticSettings:
    """How the diagnostics of one model are computed (``polycats analyze``'s defaults).

    method, tol: the eigen solver: top-only Lanczos (``lanczos(..., ends="top")``), which stops when
        the residual bound of the reported eigenvalue is within ``tol`` relative, or power iteration.
    max_iter: the budget of one solve: Lanczos products (power iteration: products per run, and up
        to two runs). A solve that meets it first is reported with ``converged=False``.
    """

    sentences: int = 32  # per task
    seed: int = 0
    method: str = "lanczos"
    tol: float = 1e-4
    max_iter: int = 100
    include_tasks: bool = True  # per-task eigenvalues (groups and combined are always computed)

    def solver(self) -> dict:
        return {"method": self.method, "tol": self.tol, "max_iter": self.max_iter, "seed": self.seed}

    @property
    def budget(self) -> int:
        """The most Hessian-vector products one solve can use."""
        return self.max_iter * (2 if self.method == "power_iteration" else 1)


#: What ``train.diagnostics_every`` logs: groups and combined only, 16 sentences per task.
TRAINING_SETTINGS = DiagnosticSettings(sentences=16, tol=1e-3, max_iter=80, include_tasks=False)


def diagnostic_closures(model: Transformer, data: PreparedData, sentences: int, seed: int) -> dict[str, LossClosure]:
    """One fixed, seeded batch of training sentences per task, as token-NLL closures."""
    closures = {}
    for index, (task, arrays) in enumerate(data.split("train").items()):
        batch = sample_batch(arrays, index, sentences, f"{seed}/{task}/diagnostics")
        closures[task] = translation_loss(model, batch.src, batch.tgt_in, batch.tgt_out, PAD)
    return closures


def group_members(groups: dict[str, str]) -> dict[str, list[str]]:
    members: dict[str, list[str]] = {}
    for task, group in groups.items():
        members.setdefault(group, []).append(task)
    return members


def combined_weights(tasks: list[str], probabilities: list[float], loss_weights: list[float]) -> dict[str, float]:
    return {task: len(tasks) * p * w for task, p, w in zip(tasks, probabilities, loss_weights)}


def analyze_model(
    model: Transformer,
    data: PreparedData,
    weights: dict[str, float],
    settings: DiagnosticSettings = DiagnosticSettings(),
    progress: Callable[[str, int], None] | None = None,
) -> dict:
    """Similarity (tasks and groups) and curvature (tasks, groups, combined) of one model.

    Returns ``summary`` (name -> number), ``converged`` and ``matvecs`` (the same eigenvalue names
    -> whether its solve met ``tol``, and the products it used), ``similarity`` and ``curvature``.
    ``progress`` goes to :func:`curvature_report`.
    """
    closures = diagnostic_closures(model, data, settings.sentences, settings.seed)
    groups = group_members(data.meta["groups"])
    similarity = gradient_similarity(model, closures, groups=groups)
    curvature = curvature_report(model, closures, groups, weights, include_tasks=settings.include_tasks,
                                 progress=progress, **settings.solver())
    summary = {}
    if {"HiRes", "LoRes"} <= set(groups):
        summary["cosine/HiRes-LoRes"] = similarity.cosine("HiRes", "LoRes")
        summary["norm_similarity/HiRes-LoRes"] = similarity.norm_similarity("HiRes", "LoRes")
    eigenvalues: dict[str, tuple[float, ExtremeEigenvalues]] = {}
    for name, result in curvature.groups.items():
        eigenvalues[f"lambda_max/{name}"] = result.largest_algebraic, result
    if curvature.combined is not None:
        eigenvalues["lambda_max/combined"] = curvature.combined.largest_algebraic, curvature.combined
        eigenvalues["lambda_maxabs/combined"] = curvature.combined.largest_magnitude, curvature.combined
    for name, result in curvature.tasks.items():
        eigenvalues[f"lambda_max/{name}"] = result.largest_algebraic, result
    summary |= {key: value for key, (value, _) in eigenvalues.items()}
    return {"summary": summary,
            "converged": {key: result.converged for key, (_, result) in eigenvalues.items()},
            "matvecs": {key: result.matvecs for key, (_, result) in eigenvalues.items()},
            "similarity": similarity, "curvature": curvature}


def warn_unconverged(result: dict, where: str, settings: DiagnosticSettings, remedy: str) -> None:
    """One warning line naming the eigenvalues of ``analyze_model``'s ``result`` whose solves
    used their whole budget."""
    failed = [key for key, converged in result["converged"].items() if not converged]
    if failed:
        warnings.warn(f"{where}: {', '.join(failed)} did not converge to tol {settings.tol:g} within "
                      f"{settings.budget} Hessian-vector products (the last estimate is reported); {remedy}",
                      DiagnosticsNotConvergedWarning, stacklevel=3)


def training_diagnostics(model: Transformer, data: PreparedData, weights: dict[str, float]) -> dict[str, float]:
    """The cheaper periodic version logged by the trainer (:data:`TRAINING_SETTINGS`: groups and
    combined only, 16 sentences per task, top-only Lanczos to tol 1e-3 within 80 products;
    documented in docs/diagnostics.md). A solve that did not converge gives a warning."""
    was_training = model.training
    try:
        with torch.random.fork_rng():
            result = analyze_model(model, data, weights, TRAINING_SETTINGS)
        warn_unconverged(result, "training diagnostics", TRAINING_SETTINGS, "the logged value is less accurate")
        return result["summary"]
    finally:
        model.train(was_training)
