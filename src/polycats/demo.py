"""``polycats demo`` / ``make demo``: the demo preset trained three ways (T=1, T=5, CATS on a
T=1 sampler) for the same number of updates, each evaluated on the test split (its group table and
two examples per language printed), then one summary table in ``OUT/summary.md`` and
``OUT/summary.json`` and the report of the runs in ``OUT/report/``. ``--methods`` picks other
entries of ``METHODS`` (the peers, T=100), all on the same preset, budget and seed."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from polycats.config import load_config, preset_path
from polycats.data.prepare import prepare
from polycats.errors import PolycatsError
from polycats.evaluate.run import evaluate_run
from polycats.evaluate.scoring import render_table
from polycats.io import atomic_write_json, atomic_write_text
from polycats.methods import METHODS, run_name
from polycats.report.report import build_report, example_indices
from polycats.train.trainer import train

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


def run_demo(out: Path, overrides: list[str], console: Console, methods: tuple[str, ...] = DEFAULT_METHODS) -> dict:
    """Train and test each of ``methods``; a run already finished in ``out`` is resumed, not redone."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise PolycatsError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    out = Path(out)
    preset = preset_path("demo")
    started = time.perf_counter()
    reports, timings = {}, {}
    for method in methods:
        config = load_config(preset, [*METHODS[method], *DEMO_OVERRIDES.get(method, []), *overrides])
        run_dir = out / run_name(method)
        console.rule(f"[bold]{method}[/] → {run_dir}")
        began = time.perf_counter()
        train(config, run_dir)
        reports[method] = evaluate_run(run_dir, "test")
        timings[method] = time.perf_counter() - began
        console.print(render_table(reports[method], title=f"{method}: test split"))
        print_examples(run_dir, prepare(config.data).references("test"), console)
    rows = summary_rows(reports)
    config = load_config(preset, overrides)
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
        "Per-method wall time (train + evaluate): " + ", ".join(f"{m} {t / 60:.1f} min" for m, t in timings.items())
        + f"; total {elapsed / 60:.1f} min.",
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
