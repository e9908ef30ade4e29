"""Experiment grids: ``polycats experiment GRID.yaml --out DIR``.

A grid file names a base preset, the methods (``polycats.methods.METHODS`` or its own), the seeds
and extra overrides. It expands to one run directory per (method, seed) with a stable name,
``DIR/runs/<method>-s<seed>``; each run is trained (resumed if it was interrupted), evaluated on
valid and test, and recorded in ``DIR/index.json`` (config, commit, status, wall time). Finished
runs are skipped, so the same command continues a grid after any interruption. Every run records
the git commit it ran from, and a grid refuses to mix commits unless told to, and to continue
runs that its file (or base preset) now defines otherwise than they ran.

>>> spec = GridSpec(name="g", base="demo", methods=["T=1", "CATS"], seeds=[1, 2])
>>> [run.name for run in expand(spec)]
['t1-s1', 'cats-s1', 't1-s2', 'cats-s2']
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polycats.config import Config, load_config, preset_path, read_yaml_file
from polycats.errors import CannotResume, Interrupted, PolycatsError
from polycats.io import atomic_write_json
from polycats.methods import METHODS, run_name

FINISHED = "finished"


class GridSpec(BaseModel):
    """A grid file (YAML). ``base``: a preset name (``configs/<base>.yaml``) or a path relative to
    the grid file; ``methods``: names from ``METHODS`` or from ``define``; ``set``: overrides for
    every run (applied after the method's)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    base: str
    methods: list[str] = Field(min_length=1)
    seeds: list[int] = Field(default=[1], min_length=1)
    set: list[str] = []
    define: dict[str, list[str]] = {}  # more methods: name -> overrides


@dataclass(frozen=True)
class GridRun:
    name: str
    method: str
    seed: int
    overrides: tuple[str, ...]


def expand(spec: GridSpec) -> list[GridRun]:
    """One run per (method, seed), seed by seed (every method's first seed is done first), each
    with its overrides: the method's, then the grid's ``set``, then the seed."""
    known = {**METHODS, **spec.define}
    unknown = [m for m in spec.methods if m not in known]
    if unknown:
        raise PolycatsError(f"grid {spec.name}: unknown method {', '.join(unknown)}; known: {', '.join(known)} "
                            "(or define it under 'define:')")
    names = [run_name(m) for m in spec.methods]
    if len(set(names)) != len(names):
        raise PolycatsError(f"grid {spec.name}: two methods map to the same run name ({', '.join(names)})")
    return [
        GridRun(f"{run_name(method)}-s{seed}", method, seed, (*known[method], *spec.set, f"train.seed={seed}"))
        for seed in spec.seeds for method in spec.methods
    ]


def load_grid(path: Path) -> tuple[GridSpec, Path]:
    """The grid spec and the path of its base preset."""
    tree = read_yaml_file(path, "grid file", "see configs/experiments/")
    try:
        spec = GridSpec.model_validate(tree)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise PolycatsError(f"invalid grid file {path}: field '{field}': {first['msg']}") from None
    base = (path.parent / spec.base) if spec.base.endswith((".yaml", ".yml")) else preset_path(spec.base)
    return spec, base


def source_commit() -> str:
    """The git commit of the polycats source that runs (``+dirty`` with uncommitted changes to
    tracked files). Outside a git checkout (a copied tree, an image): ``$POLYCATS_COMMIT`` as the
    copier states it, else ``unknown``."""
    root = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("POLYCATS_COMMIT") or "unknown"
    return commit + ("+dirty" if dirty else "")


def run_record(run_dir: Path) -> dict | None:
    path = run_dir / "experiment.json"
    return json.loads(path.read_text()) if path.exists() else None


def check_commits(spec: GridSpec, runs_dir: Path, runs: list[GridRun], commit: str) -> None:
    others = {}
    for run in runs:
        record = run_record(runs_dir / run.name)
        if record and record["commit"] != commit:
            others.setdefault(record["commit"], []).append(run.name)
    if others:
        found = "; ".join(f"{c[:12]}: {', '.join(names)}" for c, names in others.items())
        raise PolycatsError(
            f"grid {spec.name} has runs from another commit ({found}); this is {commit[:12]}. Run it from a worktree "
            "at that commit (git worktree add), or pass --allow-mixed-commits"
        )


def check_definitions(spec: GridSpec, runs_dir: Path, runs: list[GridRun], configs: dict[str, Config]) -> None:
    """Refuse a grid whose file (or base preset) now defines a run that has started otherwise than
    it ran: a finished run would be skipped and reported under the new definition. ``configs``:
    each run's config as the grid defines it now."""
    from polycats.run.directory import PLACEMENT, config_differences, summarise, with_current_defaults

    changed = []
    for run in runs:
        record = run_record(runs_dir / run.name)
        if record is not None:
            now = configs[run.name].model_dump(mode="json")
            differences = config_differences(with_current_defaults(record["config"]), now, ignore=PLACEMENT)
            if differences:
                changed.append(f"{run.name}: {summarise(differences)}")
    if changed:
        raise PolycatsError(
            f"grid {spec.name} now defines {len(changed)} of its runs otherwise than they ran ({'; '.join(changed)}); "
            f"change the grid file back, or move those run directories out of {runs_dir} to run them anew"
        )


def run_one(base: Path, run: GridRun, runs_dir: Path, commit: str, restart: bool = False) -> dict:
    """Train (resume, or with ``restart`` start over) and evaluate one run; returns its record
    (also in RUN/experiment.json)."""
    from polycats.evaluate.run import evaluate_run
    from polycats.train.trainer import train

    run_dir = runs_dir / run.name
    config = load_config(base, list(run.overrides))
    previous = {} if restart else run_record(run_dir) or {}
    record = {
        "name": run.name, "method": run.method, "seed": run.seed, "overrides": list(run.overrides),
        "config": config.model_dump(mode="json"), "commit": commit, "status": "running",
        "wall_s": float(previous.get("wall_s", 0.0)),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "experiment.json", record)
    started = time.perf_counter()
    try:
        train(config, run_dir, progress=False, restart=restart)
        for split in ("valid", "test"):
            evaluate_run(run_dir, split)
    except BaseException as error:
        interrupted = isinstance(error, (Interrupted, KeyboardInterrupt))
        record.update(status="interrupted" if interrupted else "failed",
                      error=(str(error).splitlines() or [type(error).__name__])[0][:300])
        raise
    else:
        record["status"] = FINISHED
    finally:
        record["wall_s"] += time.perf_counter() - started
        atomic_write_json(run_dir / "experiment.json", record)
    return record


def write_index(spec: GridSpec, base: Path, out: Path, runs: list[GridRun]) -> dict:
    index = {"grid": spec.model_dump(), "base": str(base), "runs": {}}
    for run in runs:
        record = run_record(out / "runs" / run.name)
        index["runs"][run.name] = (
            {key: record[key] for key in ("method", "seed", "config", "commit", "status", "wall_s", "error") if key in record}
            if record else {"method": run.method, "seed": run.seed, "status": "pending"}
        )
    atomic_write_json(out / "index.json", index)
    return index


def run_grid(grid: Path, out: Path, workers: int = 1, allow_mixed_commits: bool = False,
             only: list[str] | None = None, echo=print, device: str | None = None, restart: bool = False) -> dict:
    """Run every unfinished run of ``grid`` into ``out`` (``only``: these run names); with
    ``workers > 1`` that many runs at a time, each in its own process. ``device`` (auto, cpu,
    cuda): ``train.device`` of every run, after the grid's own overrides. ``restart``: start the
    runs named by ``only`` over, finished or not (their outputs are removed). Returns the index."""
    if workers < 1:
        raise PolycatsError(f"--workers must be >= 1, not {workers}")
    if restart and not only:
        raise PolycatsError("--restart starts runs over and removes what they wrote: name them with --only")
    spec, base = load_grid(grid)
    runs = expand(spec)
    if device is not None:
        from polycats.run.build import resolve_device

        resolve_device(device)  # no CUDA: one error now, not one per run
        runs = [replace(run, overrides=(*run.overrides, f"train.device={device}")) for run in runs]
    if only:
        unknown = sorted(set(only) - {run.name for run in runs})
        if unknown:
            raise PolycatsError(f"--only: no run named {', '.join(unknown)} in grid {spec.name}")
        runs = [run for run in runs if run.name in only]
    configs = {run.name: load_config(base, list(run.overrides)) for run in runs}  # all valid before anything trains
    out.mkdir(parents=True, exist_ok=True)
    commit = source_commit()
    all_runs = expand(spec)
    restarted = set(only) if restart else set()
    # What starts over is checked as new; the rest of the grid, selected or not, must match.
    if not allow_mixed_commits:
        check_commits(spec, out / "runs", [run for run in all_runs if run.name not in restarted], commit)
    check_definitions(spec, out / "runs", [run for run in runs if run.name not in restarted], configs)
    todo = [run for run in runs if run.name in restarted
            or (run_record(out / "runs" / run.name) or {}).get("status") != FINISHED]
    echo(f"grid {spec.name}: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run (commit {commit[:12]})")
    write_index(spec, base, out, all_runs)  # progress is visible (pending runs included) from the start
    if workers == 1:
        for run in todo:
            echo(f"{run.name}: training")
            try:
                run_one(base, run, out / "runs", commit, restart)
            except CannotResume as error:
                raise CannotResume(f"{error} (in this grid: --only {run.name} --restart)") from None
            finally:
                write_index(spec, base, out, all_runs)
            echo(f"{run.name}: finished")
    else:
        def in_process(run: GridRun) -> int:
            command = [sys.executable, "-m", "polycats", "experiment", str(grid), "--out", str(out), "--only", run.name]
            if allow_mixed_commits:
                command.append("--allow-mixed-commits")
            if device is not None:
                command += ["--device", device]
            if restart:
                command.append("--restart")
            with open(out / "runs" / f"{run.name}.log", "a") as log:  # the run's own output, appended across resumes
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
            log_path = out / "runs" / f"{run.name}.log"
            echo(f"{run.name}: finished" if code == 0 else f"{run.name}: failed (exit {code}, see {log_path})")
            return code

        (out / "runs").mkdir(exist_ok=True)
        with ThreadPoolExecutor(workers) as pool:
            codes = list(pool.map(in_process, todo))
        if any(codes):
            write_index(spec, base, out, all_runs)
            raise PolycatsError(f"grid {spec.name}: {sum(1 for c in codes if c)} of {len(todo)} runs failed; see their logs in {out / 'runs'}")
    return write_index(spec, base, out, all_runs)
