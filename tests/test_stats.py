"""Seed statistics against textbook values (t tables, hand-computed means and CIs)."""

from __future__ import annotations

import math

import pytest

from smskd.study.stats import incomplete_beta, mean_std, paired_difference, t_cdf, t_quantile


@pytest.mark.parametrize(
    ("df", "expected"),
    # Two-sided 95% critical values of Student's t (any statistics table).
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)],
)
def test_t_quantile_matches_the_tables(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_t_cdf_closed_forms() -> None:
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t)/π.
    for t in (-3.0, -0.5, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-10)
    # df = 2: F(t) = 1/2 + t / (2·sqrt(2 + t²)).
    for t in (-2.0, 0.3, 4.0):
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-10)


def test_incomplete_beta_closed_form() -> None:
    # I_x(a, 1) = x^a and I_x(1, b) = 1 − (1 − x)^b.
    assert incomplete_beta(3.0, 1.0, 0.4) == pytest.approx(0.4**3, abs=1e-12)
    assert incomplete_beta(1.0, 2.5, 0.3) == pytest.approx(1 - 0.7**2.5, abs=1e-12)


def test_mean_and_sample_std() -> None:
    assert mean_std([81.0, 84.0, 84.0]) == pytest.approx((83.0, math.sqrt(3.0)))
    assert mean_std([70.0]) == (70.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_paired_difference_by_seed() -> None:
    a = {0: 81.0, 1: 84.0, 2: 84.0, 7: 99.0}  # seed 7 has no partner: left out
    b = {0: 80.0, 1: 82.0, 2: 84.0}
    diff = paired_difference(a, b)
    # differences 1, 2, 0: mean 1, sd 1, half-width t(0.975, 2)·1/√3 = 2.4841
    assert diff is not None and diff.pairs == 3
    assert diff.mean == pytest.approx(1.0)
    assert diff.low == pytest.approx(1 - 4.302653 / math.sqrt(3), abs=1e-5)
    assert diff.high == pytest.approx(1 + 4.302653 / math.sqrt(3), abs=1e-5)
    assert diff.verdict == "no clear difference"
    clear = paired_difference({0: 85.0, 1: 86.0, 2: 87.5}, {0: 80.0, 1: 81.0, 2: 82.0})
    assert clear is not None and clear.verdict == "higher" and clear.low > 0
    one = paired_difference({0: 1.0}, {0: 0.5})
    assert one is not None and one.low is None and one.verdict == "too few seeds to tell"
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_differences_without_spread_give_no_verdict() -> None:
    # The same difference on every seed: an interval of width 0 is no evidence of a win.
    same = paired_difference({0: 81.0, 1: 82.0}, {0: 80.0, 1: 81.0})
    assert same is not None and same.low == same.high == 1.0
    assert same.verdict == "no spread to tell"
    # Accuracies are counts over the test split: the same count difference on every
    # seed leaves only rounding in the spread.
    a = {s: 100.0 * k / 10000 for s, k in enumerate((9123, 9077, 9141))}
    b = {s: 100.0 * (k - 132) / 10000 for s, k in enumerate((9123, 9077, 9141))}
    rounded = paired_difference(a, b)
    assert rounded is not None and rounded.verdict == "no spread to tell"
    equal = paired_difference({0: 81.0, 1: 82.0}, {0: 81.0, 1: 82.0})
    assert equal is not None and equal.verdict == "no clear difference"
