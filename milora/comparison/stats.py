"""The statistics of a comparison: intervals over seeds, and paired differences to a baseline.

- `mean_interval`: the mean of per-seed values and its two-sided 95 % Student t interval
  (n - 1 degrees of freedom); none for a single value.
- `paired_difference`: per seed, the method's test accuracy minus the baseline's on the same
  test items; the mean of these differences and their 95 % t interval. With a single seed
  there is no seed-to-seed spread to estimate, and the interval comes from a paired bootstrap
  over the test items instead (10,000 resamples of the items, percentile interval), which
  covers the item sampling only and says so.
A difference whose interval contains 0 is "no significant difference". Intervals are not
adjusted for the number of methods compared with the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean with a two-sided interval (``low``/``high`` None when it cannot be estimated)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    method: str  # how the interval was computed, in words

    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)

    def as_list(self) -> list[float] | None:
        return None if self.low is None else [self.low, self.high]


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student t interval of independent values (one per seed)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, None, None, 1, "a single seed: no interval over seeds")
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * spread / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, f"Student t over {n} seeds")


def clipped(interval: Interval, low: float, high: float | None = None) -> Interval:
    """``interval`` with its bounds clipped to the values the quantity can take (an accuracy: [0, 1],
    a KL: [0, inf)); the Student t interval is symmetric and can leave that range with few seeds."""
    if interval.low is None:
        return interval
    top = interval.high if high is None else min(interval.high, high)
    return Interval(interval.mean, max(interval.low, low), top, interval.n,
                    f"{interval.method}, clipped to the quantity's range")


def paired_difference(method: dict[int, Sequence[bool]], baseline: dict[int, Sequence[bool]],
                      confidence: float = CONFIDENCE, seed: int = 0) -> Interval:
    """Accuracy difference method - baseline, paired by seed and by test item.

    ``method`` / ``baseline``: seed -> per-item correctness on the same test items (in the same
    order). Seeds present in only one of them are left out.
    """
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        raise ValueError("no seed in common with the baseline")
    for s in seeds:
        if len(method[s]) != len(baseline[s]):
            raise ValueError(f"seed {s}: {len(method[s])} test items vs {len(baseline[s])} for the baseline")
    differences = [_accuracy(method[s]) - _accuracy(baseline[s]) for s in seeds]
    if len(seeds) > 1:
        interval = mean_interval(differences, confidence)
        return Interval(interval.mean, interval.low, interval.high, len(seeds),
                        f"paired by seed (same test items), Student t over {len(seeds)} seeds")
    return _bootstrap_items(method[seeds[0]], baseline[seeds[0]], confidence, seed)


def _accuracy(correct: Sequence[bool]) -> float:
    return sum(correct) / len(correct)


def _bootstrap_items(method: Sequence[bool], baseline: Sequence[bool], confidence: float, seed: int) -> Interval:
    import numpy as np

    a, b = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, a.size, size=(BOOTSTRAP_RESAMPLES, a.size))
    resampled = a[picks].mean(axis=1) - b[picks].mean(axis=1)
    low, high = np.quantile(resampled, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return Interval(float(a.mean() - b.mean()), float(low), float(high), 1,
                    f"one seed: paired bootstrap over the {a.size} test items (item sampling only)")


def verdict(difference: Interval) -> str:
    """'better' / 'worse' when the interval excludes 0, else 'no significant difference'."""
    if difference.low is None:
        return "no interval"
    if not difference.excludes_zero():
        return "no significant difference"
    return "better" if difference.mean > 0 else "worse"
