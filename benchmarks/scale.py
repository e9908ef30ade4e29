"""Throughput of the ways one machine can run an update: 1 process vs 2 torchrun processes at the
same global batch, and fp32 vs bf16 autocast (CPU).

Each setting is a separate ``polycats train`` of the demo preset (subprocesses, so each sets its
own threads); the number is the median over logging windows of the target tokens per second the
trainer logs (``tokens_per_s``, the update's tokens on every process), the first window left out
(start-up). Runs alternate, so other load on the machine slows every setting alike; only the
ratios against the first row of each table mean anything.

``--quick`` checks the harness only: ``tiny.py``'s toy model on synthetic data.

    python benchmarks/scale.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import tiny

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def tokens_per_second(processes: int, threads: int, overrides: list[str], quick: bool, updates: int) -> float:
    """Median logged target tokens/s of a short demo run (``processes`` > 1: under torchrun)."""
    from polycats.train.metrics import read_metrics

    updates, log_every = (4, 1) if quick else (updates, updates // 6)
    with tempfile.TemporaryDirectory() as out:
        settings = [*(tiny.OVERRIDES if quick else []), f"train.max_updates={updates}", f"train.log_every={log_every}",
                    f"train.valid_every={updates}", f"train.save_every={updates}", "train.keep_snapshots=false",
                    f"train.threads={threads}", *overrides]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m"] \
            if processes > 1 else [sys.executable, "-m"]
        command = [*launcher, "polycats", "train", str(CONFIG), "--out", out, *(w for s in settings for w in ("--set", s))]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        windows = [e["tokens_per_s"] for e in read_metrics(Path(out)) if e["event"] == "train"]
    return statistics.median(windows[1:] or windows)


def compare(settings: list[tuple[str, int, int, list[str]]], quick: bool, repeats: int, updates: int) -> list[dict]:
    """Rows of ``(label, processes, threads, overrides)``, alternating over ``repeats`` rounds."""
    measured: dict[str, list[float]] = {label: [] for label, *_ in settings}
    for round_ in range(repeats):
        order = settings if round_ % 2 == 0 else settings[::-1]
        for label, processes, threads, overrides in order:
            measured[label].append(tokens_per_second(processes, threads, overrides, quick, updates))
    base = statistics.median(measured[settings[0][0]])
    return [{"setting": label, "target tokens/s": round(statistics.median(values), 1),
             f"ratio vs {settings[0][0]}": round(statistics.median(values) / base, 3), "runs": len(values)}
            for label, values in measured.items()]


def process_rows(quick: bool) -> list[dict]:
    """The same global batch (2 micro-batches per update) on the machine's 2 cores: one process
    with 2 threads accumulating both, or two gloo processes with 1 thread each."""
    return compare([
        ("1 process × 2 threads, update_freq 2", 1, 2, ["train.update_freq=2"]),
        ("2 processes × 1 thread (torchrun, gloo)", 2, 1, []),
    ], quick, repeats=1 if quick else 2, updates=60)


def precision_rows(quick: bool) -> list[dict]:
    """fp32 vs bf16 autocast in one process with 2 threads, scalar balancer and CATS."""
    cats = ["balancer={name: cats, warmup_steps: 1}"]
    return compare([
        ("fp32, scalar", 1, 2, []),
        ("bf16, scalar", 1, 2, ["train.precision=bf16"]),
        ("fp32, CATS", 1, 2, cats),
        ("bf16, CATS", 1, 2, ["train.precision=bf16", *cats]),
    ], quick, repeats=1, updates=24)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from benchmarks_table import print_rows

    print_rows("1 vs 2 processes", process_rows(args.quick))
    print_rows("fp32 vs bf16", precision_rows(args.quick))
