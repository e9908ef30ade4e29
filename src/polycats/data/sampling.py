"""Which task each training batch comes from: the task table of a prepared data set and the
sampling schedule over updates (temperature or explicit weights, and the first stage of a
two-stage schedule). The trainer, ``polycats analyze`` and the benchmarks all read it here.

>>> tasks = [Task("de-en", "de", "HiRes", 8000), Task("sw-en", "sw", "LoRes", 500)]
>>> schedule = SamplingSchedule.from_config(SamplingConfig(temperature=5, first_stage_updates=100), tasks)
>>> schedule.at(0).tolist(), [round(p, 3) for p in schedule.at(100).tolist()]
([1.0, 0.0], [0.635, 0.365])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from polycats.config import SamplingConfig
from polycats.errors import PolycatsError


@dataclass(frozen=True)
class Task:
    """One translation direction of a prepared data set: its name (``sw-en``), the language of
    the config it comes from (``sw``), its resource group and its training pairs."""

    name: str
    language: str
    group: str
    train_pairs: int


def temperature_probabilities(sizes: dict[str, int], temperature: float) -> dict[str, float]:
    """p_i ∝ n_i^(1/T): T=1 proportional, T→∞ uniform."""
    scaled = {name: float(size) ** (1.0 / temperature) for name, size in sizes.items()}
    total = sum(scaled.values())
    return {name: value / total for name, value in scaled.items()}


def sampling_probabilities(sizes: dict[str, int], temperature: float, weights: dict[str, float] | None = None) -> np.ndarray:
    """Per-task probabilities in task order; explicit per-task ``weights`` replace the formula."""
    if weights:
        values = np.array([float(weights[task]) for task in sizes])
        return values / values.sum()
    probabilities = temperature_probabilities(sizes, temperature)
    return np.array([probabilities[task] for task in sizes])


@dataclass(frozen=True)
class SamplingSchedule:
    """Task probabilities by update: ``first_stage`` for the first ``first_stage_updates``
    updates (two-stage sampling), ``probabilities`` after (and always, with one stage)."""

    probabilities: np.ndarray
    first_stage: np.ndarray | None = None
    first_stage_updates: int = 0

    @classmethod
    def from_config(cls, sampling: SamplingConfig, tasks: Sequence[Task]) -> SamplingSchedule:
        """The schedule ``sampling`` describes for ``tasks``; one-line errors for weights or
        first-stage languages that do not fit the data."""
        weights = None
        if sampling.weights:
            missing = [task.language for task in tasks if task.language not in sampling.weights]
            if missing:
                raise PolycatsError(f"sampling.weights has no weight for {', '.join(missing)}; give every language a weight")
            if sum(sampling.weights[task.language] for task in tasks) <= 0:
                raise PolycatsError("sampling.weights must give a positive weight to at least one language")
            weights = {task.name: sampling.weights[task.language] for task in tasks}
        probabilities = sampling_probabilities({task.name: task.train_pairs for task in tasks}, sampling.temperature, weights)
        if not sampling.first_stage_updates:
            return cls(probabilities)
        languages = [task.language for task in tasks]
        chosen = sampling.first_stage_languages
        if chosen is None:
            chosen = [task.language for task in tasks if task.group == "HiRes"]
            if not chosen:
                raise PolycatsError("sampling.first_stage_updates: no language is HiRes (data.groups.hires_from); "
                                    "name the first stage's languages in sampling.first_stage_languages")
        unknown = [lang for lang in chosen if lang not in languages]
        if unknown:
            raise PolycatsError(f"sampling.first_stage_languages: {', '.join(unknown)} not in data.languages "
                                f"({', '.join(languages)})")
        first = np.where([lang in chosen for lang in languages], probabilities, 0.0)
        if first.sum() <= 0:
            raise PolycatsError("sampling.first_stage_languages: every one has sampling probability 0")
        return cls(probabilities, first / first.sum(), sampling.first_stage_updates)

    def at(self, update: int) -> np.ndarray:
        """Task probabilities for the batch after ``update`` updates."""
        if self.first_stage is not None and update < self.first_stage_updates:
            return self.first_stage
        return self.probabilities
