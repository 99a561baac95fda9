"""Summary statistics for results over seeds: mean ± std, and paired differences
with a Student-t 95% confidence interval.

No SciPy: the t quantile inverts the t distribution's CDF, written with the
regularized incomplete beta function (continued fraction, as in Numerical Recipes
§6.4), which is exact to ~1e-10 for the small degrees of freedom seed counts give.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and *sample* standard deviation (n − 1); the std of one value is 0."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError("x must be in [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection)."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return 0.5 * (low + high)


@dataclass(frozen=True)
class PairedDifference:
    """``a − b`` over the seeds both have: mean and its 95% CI (None below 2 pairs)."""

    mean: float
    low: float | None
    high: float | None
    pairs: int

    @property
    def verdict(self) -> str:
        """``higher`` / ``lower`` when the CI excludes 0, else ``no clear difference``.
        Differences without spread (the same on every seed, up to rounding: accuracies
        are counts over a split) give an interval of width ~0 that says nothing about
        the spread to expect: no verdict unless they are all 0."""
        if self.low is None or self.high is None:
            return "too few seeds to tell"
        if self.high - self.low <= 1e-9 * max(1.0, abs(self.mean)):
            return "no clear difference" if abs(self.mean) <= 1e-9 else "no spread to tell"
        if self.low > 0:
            return "higher"
        if self.high < 0:
            return "lower"
        return "no clear difference"


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95
) -> PairedDifference | None:
    """Paired by seed: the mean of ``a[s] − b[s]`` ± t·sd/√n; None without a common seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean, std = mean_std(diffs)
    if len(diffs) < 2:
        return PairedDifference(mean, None, None, 1)
    half = t_quantile(0.5 + confidence / 2.0, len(diffs) - 1) * std / math.sqrt(len(diffs))
    return PairedDifference(mean, mean - half, mean + half, len(diffs))
