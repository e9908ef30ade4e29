"""CATS overhead vs the scalar balancer: seconds per update and peak RSS at equal batches.

Time: all trainers live in one process and take turns on the same batches (scalar step, CATS
step, next batch...), and the ratio is the median of the per-batch ratios — robust to other load
on the machine, which slows both alike — with a 95% bootstrap interval over the rounds. Peak
RSS: each method alone in its own process. CATS pays for its per-task gradients and the Gram
matrix from the first update; ``warmup_steps=0`` makes it also pay for the α update every step;
``cats/2`` and ``cats/10`` update α every 2 or 10 steps and collect per-task gradients on those
steps only.

The machinery takes any set of methods (name → ``--set`` overrides); ``balancer_cost.py`` uses it
for the peers and for the growth with the number of languages.

    python benchmarks/cats_overhead.py --preset demo --updates 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

METHODS = {
    "scalar": [],
    "cats": ["balancer.name=cats", "balancer.warmup_steps=0"],
    # α every 2 or 10 steps: per-task passes on those steps only (docs/cats.md, update_every).
    "cats/2": ["balancer.name=cats", "balancer.warmup_steps=0", "balancer.update_every=2"],
    "cats/10": ["balancer.name=cats", "balancer.warmup_steps=0", "balancer.update_every=10"],
}


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not ru_maxrss: a child forked from a large benchmark
    process starts with the parent's resident pages, and Linux carries that high-water mark across
    exec into ru_maxrss; VmHWM belongs to the program now running."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024


def measure(preset: str, method: str, updates: int, warmup: int, threads: int, overrides: list[str]) -> dict:
    import torch

    from polycats.config import load_config, preset_path
    from polycats.train.trainer import Trainer
    import tempfile

    config = load_config(preset_path(preset), [*overrides, f"train.threads={threads}"])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, progress=False)
        torch.manual_seed(0)
        for _ in range(warmup):
            trainer.train_step([trainer.stream.next()])
        tokens, started = 0, time.perf_counter()
        for _ in range(updates):
            batch = trainer.stream.next()
            tokens += batch.target_tokens
            trainer.train_step([batch])
        elapsed = time.perf_counter() - started
    return {
        "method": method,
        "s_per_update": elapsed / updates,
        "tokens_per_s": tokens / elapsed,
        "peak_rss_mb": peak_rss_mb(),
        "parameters": sum(p.numel() for p in trainer.params),
        "tasks": len(trainer.tasks),
    }


@dataclass
class Timings:
    """Per-update seconds of each method (``seconds[m][t]``: update ``t``, taken in the same round
    for every method) and the backward passes each update cost: one, or one per task present in
    the batch when per-task gradients come from sub-batches (a model ``TaskSplit`` cannot hook)."""

    seconds: dict[str, list[float]]
    passes: dict[str, list[int]]

    def median(self, method: str) -> float:
        return statistics.median(self.seconds[method])

    def ratio(self, method: str, baseline: str) -> float:
        """Median over rounds of the per-round ratio: both were timed back to back, under the same load."""
        return statistics.median(a / b for a, b in zip(self.seconds[method], self.seconds[baseline]))

    def ratio_interval(self, method: str, baseline: str, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
        """95% bootstrap interval of :meth:`ratio` (rounds resampled with replacement, seeded):
        how far the median ratio could move in another run of as many rounds."""
        import numpy as np

        ratios = np.array([a / b for a, b in zip(self.seconds[method], self.seconds[baseline])])
        picks = np.random.default_rng(seed).integers(0, len(ratios), size=(resamples, len(ratios)))
        low, high = np.quantile(np.median(ratios[picks], axis=1), [0.025, 0.975])
        return float(low), float(high)

    def mean_passes(self, method: str) -> float:
        return statistics.fmean(self.passes[method])


def interleaved(preset: str, methods: dict[str, list[str]], updates: int, warmup: int, threads: int,
                extra: list[str]) -> Timings:
    """Time each method's updates, the methods taking turns in a rotating order. Methods with the
    same data config share one prepared dataset and one batch stream, so they step on identical
    batches."""
    import tempfile

    from polycats.config import load_config, preset_path
    from polycats.data.prepare import prepare
    from polycats.train.trainer import Trainer

    timings = Timings({method: [] for method in methods}, {method: [] for method in methods})
    groups: dict[str, list[str]] = {}  # data config → its methods
    data = {}
    with tempfile.TemporaryDirectory() as root:
        trainers = {}
        for index, (method, options) in enumerate(methods.items()):
            config = load_config(preset_path(preset), [*options, f"train.threads={threads}", *extra])
            key = config.data.model_dump_json()
            if key not in data:  # prepare reads the whole corpus even on a cache hit: once per data config
                data[key] = prepare(config.data)
            groups.setdefault(key, []).append(method)
            trainers[method] = Trainer(config, f"{root}/{index}", data=data[key], progress=False)
        for step in range(warmup + updates):
            for members in groups.values():
                batch = trainers[members[0]].stream.next()
                present = len(batch.task.unique())
                # The order rotates every step: whoever runs right after another method's step
                # inherits its allocator and cache state, so a fixed order is a bias.
                for method in members[step % len(members):] + members[:step % len(members)]:
                    trainer = trainers[method]
                    one_pass = not trainer.balancer.plan(trainer.state.update).task_gradients or trainer.task_split is not None
                    passes = 1 if one_pass else present
                    started = time.perf_counter()
                    trainer.train_step([batch])
                    if step >= warmup:
                        timings.seconds[method].append(time.perf_counter() - started)
                        timings.passes[method].append(passes)
    return timings


def run(preset: str = "demo", updates: int = 60, warmup: int = 3, threads: int = 2, extra: list[str] | None = None) -> list[dict]:
    extra = extra or []
    timings = interleaved(preset, METHODS, updates, warmup, threads, extra)
    rows = []
    for method, options in METHODS.items():
        command = [sys.executable, __file__, "--child", method, "--preset", preset, "--updates", str(updates),
                   "--warmup", str(warmup), "--threads", str(threads),
                   *sum((["--set", o] for o in [*options, *extra]), [])]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    base = rows[0]
    for row in rows:
        row["interleaved_s_per_update"] = timings.median(row["method"])
        row["time_ratio_vs_scalar"] = timings.ratio(row["method"], "scalar")
        row["ratio_ci95_low"], row["ratio_ci95_high"] = timings.ratio_interval(row["method"], "scalar")
        row["rss_ratio_vs_scalar"] = row["peak_rss_mb"] / base["peak_rss_mb"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], dest="extra")
    parser.add_argument("--child", metavar="METHOD", help="measure one method alone (its options come as --set)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.preset, args.child, args.updates, args.warmup, args.threads, args.extra)))
        return
    from benchmarks_table import print_rows

    print_rows("CATS overhead", run(args.preset, args.updates, args.warmup, args.threads, args.extra))


if __name__ == "__main__":
    main()
