"""The cost of polycats.integrations.hf: ``BalancedSeq2SeqTrainer`` with the scalar balancer vs a
plain ``Seq2SeqTrainer`` at equal steps, on CPU.

Both train copies of one randomly initialised Marian (``hf_marian.models``: the demo preset's
sizes) on the demo preset's training pairs, with the same label smoothing, learning rate and
clipping, and draw the same rows: the plain trainer is given the integration's sampler, so the
two see identical batches and the ratio is the integration's own work (per-task loss sums, the
task column, the balancer's calls and logs). Runs alternate (and which goes first), so other load
on the machine slows both alike; ``step ratio`` is the median over steps of integration / plain
seconds per step, ``train() ratio`` the same for whole ``train()`` calls (data loading included).

``--quick`` checks the harness only: ``tiny.py``'s toy model on synthetic data.

    python benchmarks/hf_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np

import tiny
from hf_marian import demo_data, models, use_all_cores


def rows(quick: bool) -> list[dict]:
    if quick:
        return overhead_rows(steps=2, warmup=1, repeats=1, batch_size=8, overrides=tuple(tiny.OVERRIDES))
    return overhead_rows(steps=12, warmup=2, repeats=2, batch_size=64)


def overhead_rows(steps: int, warmup: int, repeats: int, batch_size: int, overrides: tuple[str, ...] = ()) -> list[dict]:
    import datasets
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback
    from transformers.utils import logging as hf_logging

    from polycats.balance import ScalarBalancer
    from polycats.data.prepare import BOS, PAD
    from polycats.data.sampling import SamplingSchedule
    from polycats.integrations.hf import BalancedSeq2SeqTrainer, TemperatureSampler, TokenIdCollator, dataset_from_prepared

    threads = use_all_cores()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    config, data = demo_data(overrides)
    t = config.train
    train = dataset_from_prepared(data, "train")
    _, marian = models(config, data.vocab_size)
    schedule = SamplingSchedule.from_config(config.sampling, data.task_table)
    row_tasks = [data.tasks.index(task) for task in train["task"]]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    class SameRows(Seq2SeqTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return TemperatureSampler(row_tasks, schedule, self.args.per_device_train_batch_size, self.args.seed)

    def arguments() -> Seq2SeqTrainingArguments:
        return Seq2SeqTrainingArguments(
            "/tmp/hf-overhead", max_steps=warmup + steps, per_device_train_batch_size=batch_size, learning_rate=t.lr,
            label_smoothing_factor=t.label_smoothing, max_grad_norm=t.clip_norm, logging_steps=10, save_strategy="no",
            report_to=[], use_cpu=True, disable_tqdm=True, seed=t.seed, dataloader_pin_memory=False)

    def plain() -> tuple[list[float], float]:
        clock = StepClock()
        trainer = SameRows(model=copy.deepcopy(marian), args=arguments(), train_dataset=train.remove_columns("task"),
                           data_collator=TokenIdCollator(PAD, BOS), callbacks=[clock])
        return timed(trainer, clock)

    def integration() -> tuple[list[float], float]:
        clock = StepClock()
        trainer = BalancedSeq2SeqTrainer(model=copy.deepcopy(marian), args=arguments(), train_dataset=train,
                                         balancer=ScalarBalancer(data.tasks), schedule=schedule,
                                         data_collator=TokenIdCollator(PAD, BOS), callbacks=[clock])
        return timed(trainer, clock)

    def timed(trainer, clock) -> tuple[list[float], float]:
        started = time.perf_counter()
        trainer.train()
        return clock.seconds[warmup:], time.perf_counter() - started

    runs: dict[str, list[tuple[list[float], float]]] = {"plain": [], "integration": []}
    for repeat in range(repeats):
        order = [("plain", plain), ("integration", integration)]
        for name, run in order if repeat % 2 == 0 else reversed(order):
            runs[name].append(run())
    step_ratios = [ours / theirs for (a, _), (b, _) in zip(runs["integration"], runs["plain"]) for ours, theirs in zip(a, b)]
    m = config.model
    return [{
        "benchmark": f"train d{m.d_model} L{m.encoder_layers}+{m.decoder_layers} V{data.vocab_size}, {steps} steps of "
                     f"{batch_size} sentences, {repeats} alternating runs each",
        "threads": threads,
        "plain s/step": statistics.median(s for seconds, _ in runs["plain"] for s in seconds),
        "integration s/step": statistics.median(s for seconds, _ in runs["integration"] for s in seconds),
        "step ratio": statistics.median(step_ratios),
        "step ratio p25": float(np.percentile(step_ratios, 25)),
        "step ratio p75": float(np.percentile(step_ratios, 75)),
        "train() ratio": statistics.median(ours / theirs for (_, ours), (_, theirs) in zip(runs["integration"], runs["plain"])),
    }]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from benchmarks_table import print_rows

    print_rows("HF integration (scalar balancer) vs plain Seq2SeqTrainer at equal steps (demo preset)", rows(args.quick))


if __name__ == "__main__":
    main()
