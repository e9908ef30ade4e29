"""CATS overhead vs the scalar balancer: seconds per update and peak RSS at equal batches.

Time: both trainers live in one process and take turns on the same batches (scalar step, CATS
step, next batch...), and the ratio is the median of the per-batch ratios — robust to other load
on the machine, which slows both alike. Peak RSS: each method alone in its own process. CATS pays
for its per-task forward/backward passes and the Gram matrix from the first update;
``warmup_steps=0`` makes it also pay for the α update every step.

    python benchmarks/cats_overhead.py --preset demo --updates 30
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

METHODS = {
    "scalar": [],
    "cats": ["balancer.name=cats", "balancer.warmup_steps=0"],
}


def measure(preset: str, method: str, updates: int, warmup: int, threads: int, extra: list[str]) -> dict:
    import torch

    from polycats.config import load_config, preset_path
    from polycats.train.trainer import Trainer
    import tempfile

    config = load_config(preset_path(preset), [*METHODS[method], f"train.threads={threads}", *extra])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, progress=False)
        torch.manual_seed(0)
        for _ in range(warmup):
            trainer.train_step(trainer.stream.next())
        tokens, started = 0, time.perf_counter()
        for _ in range(updates):
            batch = trainer.stream.next()
            tokens += batch.target_tokens
            trainer.train_step(batch)
        elapsed = time.perf_counter() - started
    return {
        "method": method,
        "s_per_update": elapsed / updates,
        "tokens_per_s": tokens / elapsed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": sum(p.numel() for p in trainer.params),
        "tasks": len(trainer.tasks),
    }


def interleaved(preset: str, updates: int, warmup: int, threads: int, extra: list[str]) -> dict[str, list[float]]:
    """Per-batch seconds of each method, the methods alternating on identical batches."""
    import tempfile

    from polycats.config import load_config, preset_path
    from polycats.train.trainer import Trainer

    seconds: dict[str, list[float]] = {method: [] for method in METHODS}
    with tempfile.TemporaryDirectory() as root:
        trainers = {
            method: Trainer(load_config(preset_path(preset), [*options, f"train.threads={threads}", *extra]),
                            f"{root}/{method}", progress=False)
            for method, options in METHODS.items()
        }
        stream = next(iter(trainers.values())).stream
        for step in range(warmup + updates):
            batch = stream.next()
            for method, trainer in trainers.items():
                started = time.perf_counter()
                trainer.train_step(batch)
                if step >= warmup:
                    seconds[method].append(time.perf_counter() - started)
    return seconds


def run(preset: str = "demo", updates: int = 30, warmup: int = 3, threads: int = 2, extra: list[str] | None = None) -> list[dict]:
    import statistics

    per_batch = interleaved(preset, updates, warmup, threads, extra or [])
    rows = []
    for method in METHODS:
        command = [sys.executable, __file__, "--child", method, "--preset", preset, "--updates", str(updates),
                   "--warmup", str(warmup), "--threads", str(threads), *sum((["--set", e] for e in extra or []), [])]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    base = rows[0]
    for row in rows:
        mine = per_batch[row["method"]]
        row["interleaved_s_per_update"] = statistics.median(mine)
        row["time_ratio_vs_scalar"] = statistics.median(a / b for a, b in zip(mine, per_batch["scalar"]))
        row["rss_ratio_vs_scalar"] = row["peak_rss_mb"] / base["peak_rss_mb"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], dest="extra")
    parser.add_argument("--child", choices=sorted(METHODS))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.preset, args.child, args.updates, args.warmup, args.threads, args.extra)))
        return
    from benchmarks_table import print_rows

    print_rows("CATS overhead", run(args.preset, args.updates, args.warmup, args.threads, args.extra))


if __name__ == "__main__":
    main()
