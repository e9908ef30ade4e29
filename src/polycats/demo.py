"""``polycats demo`` / ``make demo``: the demo preset trained three ways (T=1, T=5, CATS on a
T=1 sampler) for the same number of updates, each evaluated on the test split (its group table and
two examples per language printed), then one summary table in ``OUT/summary.md`` and
``OUT/summary.json`` and the report of the runs in ``OUT/report/``. ``--methods`` picks other
entries of ``METHODS`` (the peers, T=100), all on the same preset, budget and seed.

The runs train side by side, each in its own ``polycats train`` process with an equal share of the
cores (``--jobs`` at a time; their output goes to ``OUT/logs/``): a small model's run does not keep
two cores busy, runs side by side do.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from polycats.config import load_config, preset_path
from polycats.data.prepare import prepare
from polycats.errors import Interrupted, PolycatsError
from polycats.evaluate.scoring import render_table
from polycats.io import atomic_write_json, atomic_write_text
from polycats.methods import METHODS, run_name
from polycats.report.report import build_report, example_indices
from polycats.run.directory import last_logged_update

# The demo is short: CATS starts adapting after 100 updates instead of its default 200.
DEMO_OVERRIDES = {"CATS": ["balancer.warmup_steps=100"], "CATS-loss": ["balancer.warmup_steps=100"]}
DEFAULT_METHODS = ("T=1", "T=5", "CATS")
GROUPS = ("LoRes", "HiRes", "All")


def summary_rows(reports: dict[str, dict]) -> list[dict]:
    rows = []
    for method, report in reports.items():
        row = {"method": method}
        for group in GROUPS:
            scores = report["groups"].get(group) or {}
            row[f"{group} BLEU"] = scores.get("bleu")
            row[f"{group} chrF"] = scores.get("chrf")
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    fmt = lambda v: "—" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def demo_command(out: Path, methods: tuple[str, ...], overrides: list[str]) -> str:
    """The command line that repeats a demo, quoted so that it can be pasted into a shell."""
    return shlex.join(["polycats", "demo", "--out", str(out),
                       *(["--methods", ",".join(methods)] if methods != DEFAULT_METHODS else []),
                       *(word for override in overrides for word in ("--set", override))])


def print_examples(run_dir: Path, references: dict[str, list[dict]], console: Console, per_language: int = 2) -> None:
    """Two test sentences per language: source, reference and this run's hypothesis."""
    for task, items in references.items():
        hypotheses = (run_dir / "eval" / f"test.{task}.hyp").read_text(encoding="utf-8").splitlines()
        for j in example_indices(items, per_language, f"demo/{task}"):
            console.print(f"[bold]{task}[/] #{j}\n  source:     {escape(items[j]['src'])}\n"
                          f"  reference:  {escape(items[j]['ref'])}\n  hypothesis: {escape(hypotheses[j])}")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class SideBySide:
    """Each method's run as a ``polycats train`` then a ``polycats evaluate --split test``
    process, ``jobs`` methods at a time with ``threads`` torch threads each, output appended to
    ``OUT/logs/<run>.log``. SIGINT/SIGTERM go to every process once (they save and stop; a second
    one stops them at once), then :class:`Interrupted`."""

    def __init__(self, out: Path, preset: Path, overrides: dict[str, list[str]], jobs: int, threads: int):
        self.out, self.preset, self.overrides, self.jobs, self.threads = out, preset, overrides, jobs, threads
        self.running: dict[str, tuple[str, subprocess.Popen]] = {}  # method -> (phase, process)
        self.stop_signal: int | None = None

    def command(self, method: str, phase: str) -> list[str]:
        run_dir = str(self.out / run_name(method))
        if phase == "train":
            sets = [*self.overrides[method], f"train.threads={self.threads}"]
            return [sys.executable, "-m", "polycats", "train", str(self.preset), "--out", run_dir,
                    *(word for override in sets for word in ("--set", override))]
        return [sys.executable, "-m", "polycats", "evaluate", run_dir, "--split", "test", "--threads", str(self.threads)]

    def log_path(self, method: str) -> Path:
        return self.out / "logs" / f"{run_name(method)}.log"

    def start(self, method: str, phase: str) -> None:
        with open(self.log_path(method), "a", encoding="utf-8") as log:
            # A session of its own: a Ctrl-C reaches the children once, through forward().
            process = subprocess.Popen(self.command(method, phase), stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.running[method] = (phase, process)

    def forward(self, signum: int, frame) -> None:
        self.stop_signal = signum
        for _, process in self.running.values():
            process.send_signal(signal.SIGINT)

    def failure(self, method: str, phase: str, code: int) -> PolycatsError:
        lines = self.log_path(method).read_text(encoding="utf-8", errors="replace").splitlines()
        last = next((line for line in reversed(lines) if line.strip()), "(no output)")
        return PolycatsError(f"{method}: polycats {phase} exited with {code}: {last.strip()[:300]} "
                             f"(whole output: {self.log_path(method)})")

    def run(self, methods: tuple[str, ...], max_updates: int, console: Console) -> dict[str, float]:
        """Every method trained and tested; returns each one's wall time (seconds)."""
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        waiting, began, timings = list(methods), {}, {}
        previous = {number: signal.signal(number, self.forward) for number in (signal.SIGINT, signal.SIGTERM)}
        columns = (TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[phase]}"),
                   TimeElapsedColumn())
        try:
            with Progress(*columns, console=console) as progress:
                bars = {m: progress.add_task(m, total=max_updates, phase="waiting") for m in methods}
                while waiting or self.running:
                    while waiting and len(self.running) < self.jobs and self.stop_signal is None:
                        method = waiting.pop(0)
                        began[method] = time.perf_counter()
                        self.start(method, "train")
                    for method, (phase, process) in list(self.running.items()):
                        code = process.poll()
                        if code is None:
                            continue
                        del self.running[method]
                        if code != 0 and self.stop_signal is None:
                            raise self.failure(method, phase, code)
                        if phase == "train" and self.stop_signal is None:
                            self.start(method, "evaluate")
                        elif code == 0 and phase == "evaluate":
                            timings[method] = time.perf_counter() - began[method]
                    for method in methods:
                        phase = self.running.get(method, ("done" if method in timings else "waiting", None))[0]
                        done = last_logged_update(self.out / run_name(method) / "metrics.jsonl")
                        progress.update(bars[method], completed=done, phase=phase)
                    time.sleep(0.5)
        finally:
            if self.running:  # left early (a run failed): the others save and stop too
                self.forward(signal.SIGTERM, None)
                for _, process in self.running.values():
                    process.wait()
            for number, handler in previous.items():
                signal.signal(number, handler)
        if self.stop_signal is not None:
            raise Interrupted(f"{signal.Signals(self.stop_signal).name} received: the runs in {self.out} saved their "
                              "checkpoints; run the same command to resume", self.stop_signal)
        return timings


def run_demo(out: Path, overrides: list[str], console: Console, methods: tuple[str, ...] = DEFAULT_METHODS,
             jobs: int | None = None) -> dict:
    """Train and test each of ``methods``, ``jobs`` at a time (default: all), sharing the cores;
    a run already finished in ``out`` is resumed, not redone."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise PolycatsError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    out = Path(out)
    preset = preset_path("demo")
    started = time.perf_counter()
    run_overrides = {m: [*METHODS[m], *DEMO_OVERRIDES.get(m, []), *overrides] for m in methods}
    configs = {m: load_config(preset, run_overrides[m]) for m in methods}  # every config is valid before anything runs
    config = load_config(preset, overrides)
    prepare(config.data)  # once, before the runs read it side by side
    jobs = min(jobs or len(methods), len(methods))
    threads = max(1, usable_cores() // jobs)
    console.print(f"training {', '.join(methods)}: {jobs} at a time, {threads} thread(s) each "
                  f"(their output: {out / 'logs'})")
    timings = SideBySide(out, preset, run_overrides, jobs, threads).run(methods, config.train.max_updates, console)
    reports = {}
    for method in methods:
        run_dir = out / run_name(method)
        console.rule(f"[bold]{method}[/] → {run_dir}")
        reports[method] = json.loads((run_dir / "eval" / "test.json").read_text(encoding="utf-8"))
        console.print(render_table(reports[method], title=f"{method}: test split"))
        print_examples(run_dir, prepare(configs[method].data).references("test"), console)
    rows = summary_rows(reports)
    table = Table(title=f"demo: test BLEU/chrF after {config.train.max_updates} updates (greedy={config.eval.beam == 1})")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(*("—" if v is None else (f"{v:.1f}" if isinstance(v, float) else v) for v in row.values()))
    console.print(table)
    elapsed = time.perf_counter() - started
    first = reports[methods[0]]
    sizes, signature = first["train_pairs"], first["sacrebleu_signature"]
    text = "\n".join([
        "# polycats demo",
        "",
        f"Command: `{demo_command(out, methods, overrides)}`",
        f"Preset: `{preset.name}` — training pairs {json.dumps(sizes)}; {config.train.max_updates} updates of "
        f"≤{config.train.max_tokens} tokens; model d_model={config.model.d_model}, "
        f"{config.model.encoder_layers}+{config.model.decoder_layers} layers.",
        f"Groups: {json.dumps(first.get('thresholds'))}. BLEU signature: `{signature}`.",
        "",
        markdown_table(rows),
        "",
        f"Per-method wall time (train + evaluate, {jobs} side by side, {threads} thread(s) each): "
        + ", ".join(f"{m} {t / 60:.1f} min" for m, t in timings.items()) + f"; total {elapsed / 60:.1f} min.",
        "",
        "A demo-sized budget: scores are low in absolute terms and one seed is not a significance test.",
        "The research presets in configs/ and `docs/results.md` hold the measured comparisons.",
        "",
    ])
    report = build_report([out / run_name(m) for m in methods], out / "report")
    text += f"\nThe report of these runs (curves, CATS α/λ, examples): `{report}` and `{report.with_suffix('.html')}`.\n"
    atomic_write_text(out / "summary.md", text)
    atomic_write_json(out / "summary.json", {"rows": rows, "timings_s": timings, "train_pairs": sizes, "signature": signature})
    console.print(f"summary: {out / 'summary.md'}  (runs: {', '.join(str(out / run_name(m)) for m in methods)})")
    console.print(f"report: {report} and {report.with_suffix('.html')} (open it in a browser)")
    console.print(f"total time {elapsed / 60:.1f} min. Small budget: absolute BLEU is low; compare methods, not numbers with the paper.")
    return {"rows": rows, "timings": timings}
