"""Means with 95% confidence intervals over seeds, the paired bootstrap over test sentences, and
the rule that turns a difference into a verdict on a claim (docs/results.md states it next to the
claims table).

>>> from polycats.report.stats import welch_difference, verdict
>>> d = welch_difference([12.0, 12.4, 12.2], [10.9, 11.1, 11.0])
>>> round(d.mean, 2), verdict(d, threshold=0.0)
(1.2, 'holds')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from polycats.evaluate.scoring import metric, target_language

LEVEL = 0.95
HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 12345  # sacreBLEU's default: a report's intervals are the same every time it is built


@dataclass(frozen=True)
class Difference:
    """A mean and its two-sided confidence interval; ``low``/``high`` are None when there are too
    few values for an interval (fewer than two per arm)."""

    mean: float
    low: float | None = None
    high: float | None = None

    def __str__(self) -> str:
        if self.low is None:
            return f"{self.mean:+.2f}"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _variance(values: Sequence[float]) -> float:
    centre = _mean(values)
    return math.fsum((v - centre) ** 2 for v in values) / (len(values) - 1)


def mean_ci(values: Sequence[float], level: float = LEVEL) -> Difference:
    """The mean of ``values`` with the Student-t interval (n − 1 degrees of freedom)."""
    if not values:
        raise ValueError("mean_ci needs at least one value")
    centre = _mean(values)
    if len(values) < 2:
        return Difference(centre)
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * math.sqrt(_variance(values) / len(values))
    return Difference(centre, centre - half, centre + half)


def welch_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Difference:
    """mean(a) − mean(b) with Welch's interval (unequal variances, Welch–Satterthwaite degrees of
    freedom): the seeds of two methods are independent samples."""
    centre = _mean(a) - _mean(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(centre)
    va, vb = _variance(a) / len(a), _variance(b) / len(b)
    if va + vb == 0:
        return Difference(centre, centre, centre)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf((1 + level) / 2, df) * math.sqrt(va + vb)
    return Difference(centre, centre - half, centre + half)


def paired_bootstrap(first: Mapping[str, Sequence[str]], second: Mapping[str, Sequence[str]],
                     references: Mapping[str, Sequence[str]], metric_name: str = "bleu",
                     samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> Difference:
    """``score(first) − score(second)`` with its 95% paired-bootstrap interval (Koehn, 2004), where a
    score is the unweighted mean over directions of corpus BLEU (or chrF): the report's group score.

    ``first``, ``second`` and ``references`` map each direction to its sentences, in the same order.
    Each resample draws, per direction, as many sentences as it has, with replacement, the same for
    both systems; the interval's ends are the 2.5th and 97.5th percentile of the resampled
    differences (the order statistics sacreBLEU's own bootstrap takes). It measures how much the
    difference owes to the choice of test sentences, not to the training seed.

    >>> refs = {"de-en": ["the cat sat on the mat", "a dog barked at the man"]}
    >>> d = paired_bootstrap(refs, {"de-en": ["a b c d", "e f g h"]}, refs)
    >>> [round(x, 6) for x in (d.mean, d.low, d.high)]
    [100.0, 100.0, 100.0]
    """
    rng = np.random.default_rng(seed)
    observed, resampled = 0.0, np.zeros(samples)
    for direction, sentences in references.items():
        scorer = metric(metric_name, target_language(direction))
        # sacreBLEU's per-sentence sufficient statistics (n-gram matches, lengths): a corpus score is
        # computed from their sum, so a resample's score is a weighted sum away.
        per_sentence = [np.asarray(scorer._extract_corpus_statistics(list(system[direction]), [list(sentences)]),
                                   dtype=np.float64) for system in (first, second)]
        drawn = rng.choice(len(sentences), size=(samples, len(sentences)), replace=True)
        counts = np.zeros((samples, len(sentences)))
        np.add.at(counts, (np.arange(samples)[:, None], drawn), 1.0)
        full = [scorer._compute_score_from_stats(system.sum(0)).score for system in per_sentence]
        observed += (full[0] - full[1]) / len(references)
        for sign, system in zip((1.0, -1.0), per_sentence):
            resampled += sign * np.array([scorer._compute_score_from_stats(row).score for row in counts @ system]) / len(references)
    ordered = np.sort(resampled)
    tail = samples // 40
    return Difference(observed, float(ordered[tail]), float(ordered[samples - tail - 1]))


def verdict(difference: Difference | None, threshold: float) -> str:
    """The claims rule: a claim says ``difference > threshold``. It holds when the whole 95%
    interval lies above the threshold, does not hold when the whole interval lies below it, and is
    inconclusive otherwise — including when there is no interval (one seed)."""
    if difference is None or difference.low is None:
        return INCONCLUSIVE
    if difference.low > threshold:
        return HOLDS
    if difference.high < threshold:
        return FAILS
    return INCONCLUSIVE
