"""Means with 95% confidence intervals over seeds, and the rule that turns a difference into a
verdict on a claim (docs/results.md states it next to the claims table).

>>> from polycats.report.stats import welch_difference, verdict
>>> d = welch_difference([12.0, 12.4, 12.2], [10.9, 11.1, 11.0])
>>> round(d.mean, 2), verdict(d, threshold=0.0)
(1.2, 'holds')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

LEVEL = 0.95
HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


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
