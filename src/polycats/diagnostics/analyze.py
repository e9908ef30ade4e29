"""Diagnostics of a run: gradient similarity and curvature on fixed, seeded training batches, for
one checkpoint (``analyze_model``), every saved snapshot (``analyze_run``, the Fig 5 curves) or
periodically during training (``train.diagnostics_every``).

The batches: ``sentences`` training sentences per task, drawn once with a fixed seed, so the
numbers of different checkpoints and different runs of the same data are comparable. The combined
loss is the one the trainer optimises in expectation: task ``i`` weighted by its sampling
probability ``p_i`` times the balancer's loss weight (α for CATS), i.e. ``w_i = K p_i α_i`` on
batches with one equal share per task.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from polycats.data.batching import sample_batch
from polycats.data.prepare import PAD, PreparedData
from polycats.diagnostics.curvature import ExtremeEigenvalues, curvature_report
from polycats.diagnostics.gradients import LossClosure, gradient_similarity, translation_loss
from polycats.errors import PolycatsError
from polycats.io import atomic_write_json
from polycats.model.transformer import Transformer


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


def progress_bar(show: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), disable=not show, transient=False)


SNAPSHOT = re.compile(r"update_(\d+)\.pt$")


def run_snapshots(checkpoints: Path) -> list[tuple[int, Path]]:
    found = sorted((int(m.group(1)), path) for path in checkpoints.glob("update_*.pt") if (m := SNAPSHOT.search(path.name)))
    return found


def analyze_run(
    run_dir: str | Path,
    checkpoint: str | None = None,
    settings: DiagnosticSettings = DiagnosticSettings(),
    progress: bool | None = None,
    device: str | None = None,
) -> dict:
    """Analyse one checkpoint (``best``, ``last`` or a path) or, by default, every snapshot.

    Writes ``RUN_DIR/analysis/``: ``similarity_<update>.json/.csv``, ``curvature.json`` (all
    checkpoints), ``summary.json`` and the figures. Each checkpoint's row of ``summary.json`` has
    the numbers, plus ``converged`` and ``matvecs`` per eigenvalue; a solve that did not converge
    also gives a :class:`DiagnosticsNotConvergedWarning`. ``progress``: a progress bar per
    snapshot and per solve (default: when stdout is a terminal). ``device``: auto, cpu or cuda
    (default: the run's ``train.device``).
    """
    from polycats.data.batching import sampling_probabilities
    from polycats.train.checkpoint import load_checkpoint
    from polycats.train.run_dir import RunDir, build_balancer, build_model, resolve_device
    from polycats.report.figures import similarity_heatmap, training_curves

    run = RunDir(run_dir)
    config = run.config()
    target_device = resolve_device(device or config.train.device)  # --device, else train.device; before anything is written
    data = run.prepared(config)
    if checkpoint is None:
        targets = run_snapshots(run.checkpoints)
        if not targets:
            raise PolycatsError(f"no update_*.pt snapshots in {run.checkpoints}; train with train.keep_snapshots=true or pass --checkpoint")
    else:
        path = Path(checkpoint) if checkpoint.endswith(".pt") else run.checkpoint_path(checkpoint)
        targets = [(-1, path)]
    train = data.split("train")
    probabilities = sampling_probabilities({t: len(train[t]) for t in data.tasks}, config.sampling.temperature,
                                           config.sampling.weights and {t: config.sampling.weights.get(lang, 0.0)
                                                                        for t, lang in zip(data.tasks, config.data.languages)})
    out = run.path / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    curves, curvature_all = [], {}
    model = build_model(config, data.vocab_size).to(target_device)
    with progress_bar(sys.stdout.isatty() if progress is None else progress) as bar:
        snapshots = bar.add_task("checkpoints", total=len(targets), status="")
        solve = bar.add_task("", total=None, status="")

        def solve_progress(label: str, products: int) -> None:
            if products == 0:
                bar.reset(solve, total=settings.budget, description=f"  λ {label}", status="products")
            else:
                bar.update(solve, completed=products)

        for update, path in targets:
            bar.update(snapshots, status=path.name)
            bar.reset(solve, total=None, description="  gradient similarity", status="")
            state = load_checkpoint(path)
            model.load_state_dict(state["model"])
            update = int(state.get("update", update))
            balancer = build_balancer(config, data.tasks, probabilities)
            if "balancer" in state:
                balancer.load_state_dict(state["balancer"])
            weights = combined_weights(data.tasks, probabilities.tolist(), balancer.loss_weights().tolist())
            result = analyze_model(model, data, weights, settings, progress=solve_progress)
            warn_unconverged(result, f"update {update}", settings,
                             "it is marked converged=false in summary.json; raise --max-iter or --tol")
            result["similarity"].write_json(out / f"similarity_{update:06d}.json")
            result["similarity"].write_csv(out / f"similarity_{update:06d}.csv")
            curvature_all[str(update)] = result["curvature"].to_dict()
            curves.append({"update": update, **result["summary"],
                           "converged": result["converged"], "matvecs": result["matvecs"]})
            similarity_heatmap(result["similarity"], out / f"similarity_{update:06d}.png", title=f"{config.name} update {update}")
            bar.advance(snapshots)
    summary = {"run": str(run.path), "settings": settings.__dict__, "checkpoints": curves}
    atomic_write_json(out / "curvature.json", curvature_all)
    atomic_write_json(out / "summary.json", summary)
    if len(curves) > 1:
        training_curves({config.name: curves}, out / "curves.png")
    return summary


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
