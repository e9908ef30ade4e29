"""``polycats analyze``: the diagnostics of :mod:`polycats.diagnostics.model_summary` for one
checkpoint of a run or every saved snapshot (the Fig 5 curves), written to ``RUN_DIR/analysis/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from polycats.data.sampling import SamplingSchedule
from polycats.diagnostics.model_summary import DiagnosticSettings, analyze_model, combined_weights, warn_unconverged
from polycats.errors import PolycatsError
from polycats.io import atomic_write_json
from polycats.figures import similarity_heatmap, training_curves
from polycats.run.build import build_balancer, build_model, resolve_device, set_threads
from polycats.run.checkpoint import load_checkpoint
from polycats.run.directory import RunDir


def progress_bar(show: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), disable=not show, transient=False)


def analyze_run(
    run_dir: str | Path,
    checkpoint: str | None = None,
    settings: DiagnosticSettings = DiagnosticSettings(),
    progress: bool | None = None,
    device: str | None = None,
    threads: int | None = None,
    updates: list[int] | None = None,
) -> dict:
    """Analyse one checkpoint (``best``, ``last`` or a path) or, by default, every snapshot
    (``updates``: only the snapshots of these updates).

    Writes ``RUN_DIR/analysis/``: ``similarity_<update>.json/.csv``, ``curvature.json`` (all
    checkpoints), ``summary.json`` and the figures. Each checkpoint's row of ``summary.json`` has
    the numbers, plus ``converged`` and ``matvecs`` per eigenvalue; a solve that did not converge
    also gives a :class:`DiagnosticsNotConvergedWarning`. ``progress``: a progress bar per
    snapshot and per solve (default: when stdout is a terminal). ``device``: auto, cpu or cuda
    (default: the run's ``train.device``); ``threads``: CPU threads (default: ``train.threads``).
    """
    run = RunDir(run_dir)
    config = run.config()
    set_threads(config.train.threads if threads is None else threads)
    target_device = resolve_device(device or config.train.device)  # --device, else train.device; before anything is written
    data = run.prepared(config)
    if checkpoint is None:
        targets = run.snapshots()
        if not targets:
            raise PolycatsError(f"no update_*.pt snapshots in {run.checkpoints}; train with train.keep_snapshots=true or pass --checkpoint")
        if updates:
            missing = sorted(set(updates) - {update for update, _ in targets})
            if missing:
                raise PolycatsError(f"--updates: no snapshot of update {', '.join(map(str, missing))} in {run.checkpoints}; "
                                    f"it has {', '.join(str(update) for update, _ in targets)}")
            targets = [(update, path) for update, path in targets if update in updates]
    else:
        path = Path(checkpoint) if checkpoint.endswith(".pt") else run.checkpoint_path(checkpoint)
        targets = [(-1, path)]
    sampling = SamplingSchedule.from_config(config.sampling, data.task_table)  # as the trainer samples
    out = run.path / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    # Results are keyed by update and merged with earlier calls: `--checkpoint last` after a full
    # analysis adds or replaces one row, and an interrupted analysis of every snapshot resumes.
    rows, curvature_all = previous_results(out)
    done = {update for update, row in rows.items() if row.get("settings") == settings.__dict__} if checkpoint is None else set()
    targets = [(update, path) for update, path in targets if update not in done]
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
            balancer = build_balancer(config, data.tasks, sampling.probabilities)
            if "balancer" in state:
                balancer.load_state_dict(state["balancer"])
            weights = combined_weights(data.tasks, sampling.at(update).tolist(), balancer.loss_weights().tolist())
            result = analyze_model(model, data, weights, settings, progress=solve_progress)
            warn_unconverged(result, f"update {update}", settings,
                             "it is marked converged=false in summary.json; raise --max-iter or --tol")
            result["similarity"].write_json(out / f"similarity_{update:06d}.json")
            result["similarity"].write_csv(out / f"similarity_{update:06d}.csv")
            curvature_all[str(update)] = result["curvature"].to_dict()
            rows[update] = {"update": update, **result["summary"], "converged": result["converged"],
                            "matvecs": result["matvecs"], "settings": settings.__dict__}
            similarity_heatmap(result["similarity"], out / f"similarity_{update:06d}.png", title=f"{config.name} update {update}")
            summary = write_results(out, run.path, settings, rows, curvature_all)  # after each one: a kill loses one point
            bar.advance(snapshots)
    summary = write_results(out, run.path, settings, rows, curvature_all)
    curves = summary["checkpoints"]
    if len(curves) > 1:
        training_curves({config.name: curves}, out / "curves.png")
    return summary


def previous_results(out: Path) -> tuple[dict[int, dict], dict[str, dict]]:
    """The rows of an earlier ``summary.json`` by update, and its ``curvature.json``."""
    try:
        rows = {int(row["update"]): row for row in json.loads((out / "summary.json").read_text())["checkpoints"]}
        curvature = json.loads((out / "curvature.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return {}, {}  # none yet, or unreadable: start afresh (it is rewritten whole, atomically)
    return rows, curvature


def write_results(out: Path, run_path: Path, settings: DiagnosticSettings, rows: dict[int, dict],
                  curvature: dict[str, dict]) -> dict:
    summary = {"run": str(run_path), "settings": settings.__dict__, "checkpoints": [rows[u] for u in sorted(rows)]}
    atomic_write_json(out / "curvature.json", curvature)
    atomic_write_json(out / "summary.json", summary)
    return summary
