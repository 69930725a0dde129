"""attnlab.stats against scipy's own answers and the formulas written out here."""

from __future__ import annotations

import math
import statistics
import sys

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from attnlab import stats

scipy_stats = pytest.importorskip("scipy.stats")

# Two groups of 15 with unequal spreads (the first example of Welch's test on Wikipedia).
A1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
A2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


def welch_by_hand(a, b):
    """Welch's t and the Welch-Satterthwaite degrees of freedom, then the two-sided p."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, df, 2 * scipy_stats.t.sf(abs(t), df)


def test_mean_and_sample_std():
    assert stats.mean([1.0, 2.0, 6.0]) == 3.0
    assert stats.std([1.0, 2.0, 6.0]) == pytest.approx(math.sqrt(7.0))  # (4 + 1 + 9) / 2
    assert stats.std([0.123, 0.123]) == 0.0  # exact, so "± 0" and not "± 1e-17"
    assert stats.std([5.0]) is None  # one seed says nothing about the spread
    with pytest.raises(ValueError, match="at least one"):
        stats.mean([])
    with pytest.raises(TypeError, match="numbers"):
        stats.std(["a", 1])


def test_welch_p_value_is_scipy_and_the_hand_formula():
    t, df, p = welch_by_hand(A1, A2)
    assert (round(t, 2), round(df, 1), round(p, 3)) == (-2.46, 25.0, 0.021)  # published
    d = stats.welch(A1, A2)
    assert d.p == pytest.approx(p, rel=1e-9)
    assert d.p == pytest.approx(scipy_stats.ttest_ind(A1, A2, equal_var=False).pvalue,
                                rel=1e-12)
    assert d.tested and d.significant and d.diff == pytest.approx(statistics.fmean(A1)
                                                                   - statistics.fmean(A2))
    assert (d.n_a, d.n_b, d.how) == (15, 15, "Welch's t-test")


accuracies = st.integers(0, 500).map(lambda k: k / 500)  # test accuracy on 500 examples


@given(st.lists(accuracies, min_size=2, max_size=8), st.lists(accuracies, min_size=2,
                                                               max_size=8))
def test_welch_is_scipys_ttest_ind(a, b):
    assume(len(set(a)) > 1 and len(set(b)) > 1)  # constant samples: their own rules, below
    want = scipy_stats.ttest_ind(a, b, equal_var=False).pvalue
    assert stats.welch(a, b).p == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_a_constant_sample_is_tested_without_scipys_precision_warning():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ttest_ind warns here: [0.4] * 3 has mean 0.4 + eps
        d = stats.welch([0.4, 0.4, 0.4], [0.41, 0.39, 0.42])
    _, _, p = welch_by_hand([0.4, 0.4, 0.4], [0.41, 0.39, 0.42])  # exact variance 0
    assert d.p == pytest.approx(p, rel=1e-12)


def test_welch_is_not_students_test_with_unequal_sizes_and_spreads():
    a, b = [0.40, 0.41, 0.39, 0.40, 0.41, 0.40], [0.30, 0.50, 0.38]
    _, _, p = welch_by_hand(a, b)
    student = scipy_stats.ttest_ind(a, b, equal_var=True).pvalue
    assert abs(student - p) > 0.05  # the two tests disagree here: which one ran matters
    assert stats.welch(a, b).p == pytest.approx(p, rel=1e-9)


def test_significance_level_is_the_named_constant():
    assert stats.ALPHA == 0.05 and stats.CONFIDENCE == pytest.approx(0.95)
    a, b = [0.0, 1.0, 2.0, 3.0], [2.5, 3.5, 4.5, 5.5]
    p = stats.welch(a, b).p
    assert 0.01 < p < 0.05
    assert stats.welch(a, b).significant
    assert not stats.welch(a, b, alpha=0.01).significant


def test_interval_is_scipys_t_interval():
    x = [0.396, 0.412, 0.389, 0.401]
    for level in (0.95, 0.9, 0.99):
        ci = stats.confidence_interval(x, level)
        lo, hi = scipy_stats.t.interval(level, len(x) - 1, loc=np.mean(x),
                                        scale=scipy_stats.sem(x))
        assert (ci.low, ci.high) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
        assert ci.half_width == pytest.approx((hi - lo) / 2, rel=1e-12)
    assert stats.confidence_interval(x).confidence == 0.95  # the default
    with pytest.raises(ValueError, match="confidence"):
        stats.confidence_interval(x, 95)


def test_one_value_gives_no_interval_and_says_so():
    ci = stats.confidence_interval([0.7])
    assert (ci.mean, ci.low, ci.high, ci.half_width, ci.n) == (0.7, None, None, None, 1)
    assert "no CI" in ci.note and "1 seed" in ci.note


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
    """With 3 seeds a normal (z = 1.96) interval would cover only ~82%: the t quantile is
    what makes 95% true, and this test would see the difference."""
    rng = np.random.default_rng(0)
    hits = sum(ci.low <= 0.0 <= ci.high for ci in
               (stats.confidence_interval(rng.normal(0.0, 1.0, 3)) for _ in range(4000)))
    assert 0.935 < hits / 4000 < 0.965


@given(st.lists(finite, min_size=1, max_size=8), st.randoms())
def test_equal_samples_are_never_significant(xs, rnd):
    ys = list(xs)
    rnd.shuffle(ys)
    d = stats.welch(xs, ys)
    assert not d.significant
    assert d.p == 1.0 if len(xs) >= 2 else d.p is None


@given(finite, st.integers(2, 6), st.integers(2, 6))
def test_equal_constant_samples_of_any_sizes_are_not_significant(c, n, m):
    d = stats.welch([c] * n, [c] * m)  # scipy's own answer here is NaN
    assert (d.p, d.significant, d.tested) == (1.0, False, True)


def test_two_different_constant_samples_are_significant_as_the_welch_limit():
    d = stats.welch([0.5, 0.5], [0.4, 0.4, 0.4])
    assert (d.p, d.significant) == (0.0, True)
    # scipy's mean of [0.4] * 3 is off by rounding, so it sees a tiny variance (and warns):
    # its p is ~1e-31, the same conclusion reached through catastrophic cancellation
    with pytest.warns(RuntimeWarning, match="cancellation"):
        assert scipy_stats.ttest_ind([0.5, 0.5], [0.4] * 3, equal_var=False).pvalue < 1e-20
    # a spread that shrinks towards zero makes Welch's p go to that limit
    ps = [stats.welch([0.5 - e, 0.5 + e], [0.4 - e, 0.4 + e]).p for e in (1e-2, 1e-3, 1e-4)]
    assert ps == sorted(ps, reverse=True) and ps[-1] < 1e-4


def test_one_seed_on_a_side_is_untested_never_significant():
    d = stats.welch([0.9], [0.1, 0.11, 0.12])
    assert (d.tested, d.significant, d.p) == (False, False, None)
    assert "needs 2" in d.how and d.diff == pytest.approx(0.9 - 0.11)


def test_non_finite_values_are_reported_not_raised():
    inf, nan = math.inf, math.nan
    assert stats.mean([inf, 1.0]) == inf and math.isnan(stats.mean([nan, 1.0]))
    assert math.isnan(stats.std([inf, 1.0]))
    ci = stats.confidence_interval([inf, 1.0])
    assert ci.low is None and "non-finite" in ci.note
    d = stats.welch([inf, 1.0], [1.0, 2.0])
    assert (d.tested, d.significant, d.p) == (False, False, None) and "non-finite" in d.how


@given(st.lists(finite, min_size=2, max_size=10))
def test_interval_contains_the_mean_and_shrinks_with_n(xs):
    assume(stats.std(xs) > 1e-6)  # not constant
    ci = stats.confidence_interval(xs)
    assert ci.low < stats.mean(xs) < ci.high
    # the same values seen twice: about the same spread, twice the seeds, a narrower interval
    more = stats.confidence_interval(xs + xs)
    assert more.half_width < ci.half_width
    assert more.low <= more.mean <= more.high


@given(st.lists(finite, min_size=2, max_size=10))
def test_mean_and_std_agree_with_numpy(xs):
    assert stats.mean(xs) == pytest.approx(np.mean(xs), rel=1e-9, abs=1e-9)
    assert stats.std(xs) == pytest.approx(np.std(xs, ddof=1), rel=1e-7, abs=1e-9)


def test_format_p():
    assert stats.format_p(0.4123) == "p = 0.41"
    assert stats.format_p(0.0123) == "p = 0.012"
    assert stats.format_p(0.0004) == "p < 0.001" and stats.format_p(0.0) == "p < 0.001"


def test_without_scipy_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy now raises ImportError
    assert stats.mean([1.0, 2.0]) == 1.5 and stats.std([1.0, 3.0]) == math.sqrt(2)
    with pytest.raises(ImportError, match=r"attnlab.stats: confidence intervals .* needs `scipy`.*\.\[viz\]"):
        stats.confidence_interval([1.0, 2.0])
    with pytest.raises(ImportError, match="scipy"):
        stats.welch([1.0, 2.0], [3.0, 4.5])
