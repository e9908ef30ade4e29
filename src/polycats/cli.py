"""The ``polycats`` command line: prepare → train → evaluate (→ translate), and the demo.

Errors in the user's input, usage errors and file-system errors on a named path are one line on
stderr and exit code 2; ``--debug`` shows the traceback instead. ``train`` stopped by
SIGINT/SIGTERM saves a checkpoint and exits 128 + signal.
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from polycats.errors import Interrupted, PolycatsError, printable
from polycats.io import unwritable_reason
from polycats.methods import METHODS

app = typer.Typer(
    help="Multilingual translation on imbalanced data: temperature sampling, CATS, diagnostics.",
    add_completion=False, pretty_exceptions_enable=False,
)
console = Console()
state = {"debug": False}

ConfigArg = Annotated[Path, typer.Argument(help="YAML config, e.g. configs/demo.yaml")]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="override a config field: --set train.max_updates=20")]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda (default: train.device of the config)")]
ThreadsOption = Annotated[Optional[int], typer.Option("--threads", min=0, help="CPU threads (default: train.threads of the run's config; 0: torch's default)")]


def require_writable(directory: Path, option: str) -> None:
    """Refuse an output directory files cannot be made in before any work starts (and before the
    traceback the first write would give, hours later)."""
    reason = unwritable_reason(directory)
    if reason is not None:
        raise PolycatsError(f"{option} {directory}: {reason}; make it writable or choose another {option}")


def require_writable_run(run_dir: Path, writes: str) -> None:
    """``evaluate``/``analyze`` write into the run directory: refuse a read-only one up front."""
    reason = unwritable_reason(run_dir) if run_dir.is_dir() else None
    if reason is not None:
        raise PolycatsError(f"{run_dir}: {reason}; this command writes {writes} there: make it writable "
                            "or copy the run directory somewhere writable")


def file_system_error(error: OSError) -> str:
    """The one line for an OSError on a path that escaped a command: the path, what is wrong
    with where it goes, and the setting to change."""
    from polycats.config import cache_dir

    path = Path(error.filename)
    # A file in the way of a directory: the problem is on the path itself; otherwise where it goes.
    in_the_way = isinstance(error, (FileExistsError, NotADirectoryError))
    reason = unwritable_reason(path if in_the_way else path.parent) or error.strerror or str(error)
    if path.resolve().is_relative_to(cache_dir().resolve()):
        fix = f"set POLYCATS_CACHE to a writable directory (prepared data is cached there; now {cache_dir()})"
    else:
        fix = "make it writable or choose another location"
    return f"{path}: {reason}; {fix}"


@app.callback()
def options(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks instead of one-line errors")] = False) -> None:
    state["debug"] = debug


@app.command()
def prepare(config: ConfigArg, set_: SetOption = None) -> None:
    """Read the corpus, make the splits, train the tokenizer and binarise (cached)."""
    from polycats.config import load_config
    from polycats.data.prepare import prepare as prepare_data

    data = prepare_data(load_config(config, set_).data)
    from rich.table import Table

    table = Table(title=f"prepared data: {data.root}")
    for column in ("task", "group", "requested", "train", "valid", "test"):
        table.add_column(column, justify="left" if column in ("task", "group") else "right")
    for task in data.tasks:
        sizes = data.meta["sizes"][task]
        table.add_row(task, data.meta["groups"][task], *(str(sizes[k]) for k in ("requested", "train", "valid", "test")))
    console.print(table)
    console.print(f"vocabulary {data.vocab_size} pieces; groups: {data.meta['group_thresholds']}")


@app.command()
def train(
    config: ConfigArg,
    out: Annotated[Path, typer.Option("--out", help="run directory (resumed if it has a checkpoint)")],
    set_: SetOption = None,
    device: DeviceOption = None,
    restart: Annotated[bool, typer.Option("--restart", help="start over: remove OUT's metrics, checkpoints, "
                                          "tb/, eval/ and analysis/ of an earlier run instead of resuming it")] = False,
) -> None:
    """Train a model (prepares the data if needed; resumes from OUT's last checkpoint)."""
    from polycats.config import load_config
    from polycats.train.trainer import train as run_training

    require_writable(out, "--out")
    valid = run_training(load_config(config, [*(set_ or []), f"train.device={device}"] if device else set_), out,
                         restart=restart)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports for every process
        console.print(f"done: {out}  valid NLL {valid.get('valid_nll', float('nan')):.3f}  "
                      f"(metrics.jsonl, checkpoints/, tb/)")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run directory made by polycats train")],
    split: Annotated[str, typer.Option(help="valid or test")] = "test",
    checkpoint: Annotated[Optional[str], typer.Option(help="best or last (default: eval.checkpoint)")] = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Decode a split, score BLEU/chrF per direction, write RUN_DIR/eval/<split>.json."""
    from polycats.evaluate.run import evaluate_run
    from polycats.evaluate.scoring import render_table

    require_writable_run(run_dir, "eval/")
    report = evaluate_run(run_dir, split, checkpoint, device, threads)
    console.print(render_table(report, title=f"{run_dir} — {split}"))
    console.print(f"written: {Path(run_dir) / 'eval' / f'{split}.json'}")


@app.command()
def translate(
    run_dir: Annotated[Path, typer.Argument(help="a trained run directory")],
    src_lang: Annotated[str, typer.Option("--src-lang", help="source language code")],
    tgt_lang: Annotated[str, typer.Option("--tgt-lang", help="target language code")],
    checkpoint: Annotated[Optional[str], typer.Option(help="best or last")] = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Translate stdin to stdout, one sentence per line."""
    from polycats.config import LANGUAGE_CODE

    for option, code in (("--src-lang", src_lang), ("--tgt-lang", tgt_lang)):
        if not LANGUAGE_CODE.fullmatch(code):
            raise PolycatsError(f"{option} {code!r} is not a language code (letters, digits and '_', e.g. sw)")
    raw = sys.stdin.buffer.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise PolycatsError(f"standard input line {line} is not valid UTF-8; send UTF-8 text") from None
    # One output line per input line: split on newlines only (str.splitlines would also split on
    # U+2028, U+0085, form feeds ... inside a sentence and misalign the output).
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines[-1] == "":
        lines.pop()
    from polycats.evaluate.run import translate_lines

    for output in translate_lines(run_dir, lines, src_lang, tgt_lang, checkpoint, device, threads):
        sys.stdout.write(output + "\n")


@app.command()
def analyze(
    run_dir: Annotated[Path, typer.Argument(help="a trained run directory")],
    checkpoint: Annotated[Optional[str], typer.Option(help="best, last or a .pt path (default: every update_N.pt snapshot, for curves)")] = None,
    sentences: Annotated[int, typer.Option(min=1, help="training sentences per task in the fixed diagnostic batches")] = 32,
    method: Annotated[str, typer.Option(help="lanczos (top end only) or power_iteration")] = "lanczos",
    tol: Annotated[float, typer.Option(help="relative tolerance of the eigenvalue (Lanczos: its residual bound), "
                                            "in (0, 1)")] = 1e-4,
    max_iter: Annotated[int, typer.Option(min=1, help="budget of Hessian-vector products per eigenvalue (power iteration: per run, "
                                               "up to two runs); a solve that uses it all is reported as not converged")] = 100,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="seed of the diagnostic batches and the eigen solver")] = 0,
    tasks: Annotated[bool, typer.Option("--tasks/--groups-only", help="an eigenvalue per task too, or only per group "
                                        "and combined (3 solves instead of K + 3: the Fig 5 curves)")] = True,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    updates: Annotated[Optional[str], typer.Option(help="only the snapshots of these updates, e.g. 500,1500,2500 "
                                                   "(default: every snapshot)")] = None,
) -> None:
    """Gradient similarity and top Hessian eigenvalues → RUN_DIR/analysis/ (JSON, CSV, PNG)."""
    from rich.table import Table

    from polycats.diagnostics.analyze import DiagnosticSettings, analyze_run

    if method not in ("power_iteration", "lanczos"):
        raise PolycatsError(f"--method must be power_iteration or lanczos, not '{method}'")
    if not 0 < tol < 1:  # written so that nan fails too
        raise PolycatsError(f"--tol must be a number in (0, 1), e.g. 1e-4, not {tol}")
    try:
        chosen = [int(update) for update in updates.split(",")] if updates else None
    except ValueError:
        raise PolycatsError(f"--updates must be update numbers separated by commas, e.g. 500,1500,2500, not '{updates}'") from None
    if chosen and checkpoint is not None:
        raise PolycatsError("--updates picks snapshots and --checkpoint one checkpoint: give one of them")
    require_writable_run(run_dir, "analysis/")
    settings = DiagnosticSettings(sentences=sentences, seed=seed, method=method, tol=tol, max_iter=max_iter, include_tasks=tasks)
    summary = analyze_run(run_dir, checkpoint, settings, device=device, threads=threads, updates=chosen)
    rows = summary["checkpoints"]
    keys = sorted({k for row in rows for k, v in row.items() if k != "update" and not isinstance(v, dict)})
    table = Table(title=f"{run_dir} — diagnostics (λ_max: largest algebraic Hessian eigenvalue)")
    table.add_column("measure")
    for row in rows:
        table.add_column(f"update {row['update']}", justify="right")

    def cell(row: dict, key: str) -> str:
        if row.get(key) is None:
            return "—"
        return f"{row[key]:.4g}" + ("" if row["converged"].get(key, True) else " *")

    for key in keys:
        table.add_row(key, *(cell(row, key) for row in rows))
    console.print(table)
    if any(not ok for row in rows for ok in row["converged"].values()):
        console.print(f"* did not converge to tol {tol:g} within {settings.budget} Hessian-vector products (see the warnings)")
    console.print(f"written: {Path(run_dir) / 'analysis'}")


@app.command()
def report(
    paths: Annotated[list[Path], typer.Argument(help="experiment directories (index.json), folders of run directories, or run directories")],
    out: Annotated[Path, typer.Option("--out", help="where report.md, report.html and the figures go")],
    results: Annotated[Optional[Path], typer.Option("--results", help="also write this Markdown page (e.g. docs/results.md), figures in a folder beside it")] = None,
) -> None:
    """Tables (BLEU/chrF ± 95% CI, claims), curves, diagnostics and examples over runs and grids."""
    from polycats.report.report import build_report

    require_writable(out, "--out")
    if results is not None:
        require_writable(results.parent, "--results")
    command = "polycats report " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["report"] else None
    console.print(f"written: {build_report(paths, out, command=command, results=results)} (+ report.html, figures)")


@app.command()
def experiment(
    grid: Annotated[Path, typer.Argument(help="grid file, e.g. configs/experiments/ted_like.yaml")],
    out: Annotated[Path, typer.Option("--out", help="experiment directory: runs/, index.json")],
    workers: Annotated[int, typer.Option(min=1, help="runs at a time, each in its own process")] = 1,
    allow_mixed_commits: Annotated[bool, typer.Option("--allow-mixed-commits", help="continue a grid whose runs "
                                                      "came from another git commit")] = False,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="run only this run name (repeatable)")] = None,
    device: DeviceOption = None,
    restart: Annotated[bool, typer.Option("--restart", help="start the runs named by --only over, finished or "
                                          "not (removes their metrics, checkpoints, tb/, eval/, analysis/)")] = False,
) -> None:
    """Train and evaluate every run of a grid (methods × seeds); finished runs are skipped,
    interrupted ones resumed; OUT/index.json records config, commit, status and wall time."""
    from polycats.experiment import run_grid

    require_writable(out, "--out")
    index = run_grid(grid, out, workers, allow_mixed_commits, only, echo=console.print, device=device, restart=restart)
    done = sum(1 for record in index["runs"].values() if record["status"] == "finished")
    console.print(f"{done}/{len(index['runs'])} runs finished: {out / 'index.json'}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="where the runs and the summary go")] = Path("runs/demo"),
    methods: Annotated[str, typer.Option(
        "--methods", help=f"comma-separated, any of: {', '.join(METHODS)}")] = "T=1,T=5,CATS",
    set_: SetOption = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", min=1, help="runs trained at once, sharing the cores "
                                                "(default: all of them)")] = None,
) -> None:
    """The main job: T=1 vs T=5 vs CATS on the demo preset (Bible, de/fr vs sw/tl → en), with a summary."""
    from polycats.demo import run_demo

    require_writable(out, "--out")
    run_demo(out, set_ or [], console, tuple(m.strip() for m in methods.split(",") if m.strip()), jobs)


def main() -> None:
    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        """Warnings as one ``warning:`` line (``--debug``: Python's usual format)."""
        if state["debug"]:
            usual(message, category, filename, lineno, file, line)
        else:
            print(f"warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            usual, warnings.showwarning = warnings.showwarning, show_warning
            # Not standalone: usage errors come here to be one line like the rest (click's own are a box).
            code = app(args=sys.argv[1:] or ["--help"], standalone_mode=False)
        if code:  # --help and Ctrl-C exit through here; a command that ran returns None
            sys.exit(code)
    except typer.TyperException as error:  # click's usage errors: missing --out, --sentences abc, ...
        print(f"error: {printable(error.format_message().rstrip('.'))}; add --help for usage", file=sys.stderr)
        sys.exit(2)
    except Interrupted as error:  # a checkpoint was saved: not an error, but not a finished run either
        print(f"stopped: {printable(error)}", file=sys.stderr)
        sys.exit(128 + error.signal_number)
    except PolycatsError as error:
        if state["debug"]:
            raise
        print(f"error: {printable(error)}", file=sys.stderr)  # one line, whatever input it echoes
        sys.exit(2)
    except OSError as error:
        if state["debug"] or error.filename is None:
            raise
        print(f"error: {printable(file_system_error(error))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
