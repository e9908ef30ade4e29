"""Fault injection for tests: make the training loss of chosen batches NaN, so the trainer's
non-finite guard is tested end to end (in-process, or in a forked child before it runs the CLI).
Batches are counted from 1 over the run and include skipped ones; the product has no such hook."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pytest
import torch

from polycats.train.trainer import Trainer


def poison_batches(patch: pytest.MonkeyPatch, batches: Iterable[int]) -> None:
    """Until ``patch`` is undone, batches ``batches`` of every run have NaN task losses (the tasks
    present in them; absent tasks keep their 0, as a NaN forward pass would leave them)."""
    chosen = set(batches)
    original = Trainer.task_losses

    def task_losses(self: Trainer, batch, step_totals):
        sums, tokens = original(self, batch, step_totals)
        if self.state.batches_drawn + 1 in chosen:
            sums = torch.where(tokens > 0, sums * math.nan, sums)
        return sums, tokens

    patch.setattr(Trainer, "task_losses", task_losses)
