"""Statistics over repeated runs (seeds): the one place the report's numbers come from.

* :func:`mean` and :func:`std` (the *sample* standard deviation, divide by ``n - 1``;
  ``None`` for one value: one run says nothing about the spread), from the standard
  library's :mod:`statistics` (exact arithmetic, so ``[x, x]`` has std exactly 0).
* :func:`confidence_interval`: the Student-t interval of the mean,
  ``mean ± t_{1 - alpha/2, n - 1} * s / sqrt(n)`` (``scipy.stats.t.ppf``). With one value
  there is no interval: the result says so in :attr:`Interval.note` and has no bounds.
* :func:`welch`: is the difference of two means larger than their seed-to-seed spread?
  Welch's two-sample t-test (``equal_var=False``: it does not assume the two mechanisms
  vary equally from seed to seed), two-sided, significant when ``p < ALPHA``. It is
  scipy's ``ttest_ind_from_stats``, which gives ``ttest_ind``'s answer, fed with exact
  means and variances from :mod:`statistics`: ``ttest_ind`` itself sees a variance of
  ~1e-34 in a constant sample such as ``[0.4, 0.4, 0.4]`` (its float mean is off by a
  rounding) and warns of catastrophic cancellation, and seeds that all give the same
  accuracy are common. The cases the t statistic cannot handle are decided here:

  - fewer than 2 values on a side: no variance, so no test; ``tested`` is False and the
    difference is never called significant;
  - both samples constant (zero variance) and equal, e.g. two exact mechanisms that give
    the same accuracy on every seed: ``p = 1``, never significant;
  - both constant (n >= 2 each) with different values: every seed of one beat every seed of
    the other and neither varied at all. This is the limit of Welch's statistic as both
    spreads go to 0 (``|t| -> inf``, ``p -> 0``, what scipy itself returns), so it is
    significant with ``p = 0``. A permutation test was the alternative; with 2 seeds each
    its smallest possible p is 1/3, so it could never call any difference significant,
    which says more about the test than about the runs.

  Samples that are equal as multisets always give ``t = 0``, ``p = 1``.

A diverged run is reported, not raised (``nan`` or ``inf`` metrics, see
:func:`attnlab.train.metrics.perplexity`): a non-finite value makes the mean and std what
IEEE arithmetic makes them (``inf``, ``nan``), and gives no interval and no test, each
result saying so.

scipy is an optional dependency (the ``viz`` extra, which the report needs anyway); it is
imported when an interval or a test is asked for, so :func:`mean` and :func:`std` work
without it (training summaries use them). No correction for multiple comparisons is made:
with 20 mechanisms compared to one, about one "significant" result is expected by chance
at ``ALPHA = 0.05``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from attnlab.util.optional import optional_import

__all__ = ["ALPHA", "CONFIDENCE", "Difference", "Interval", "confidence_interval",
           "format_p", "mean", "std", "welch"]

#: Significance level of every test in the report: a difference with ``p < ALPHA`` is a
#: finding, one with ``p >= ALPHA`` is within the seed-to-seed spread.
ALPHA = 0.05
#: Confidence level of the intervals, ``1 - ALPHA`` so that an interval and a test agree.
CONFIDENCE = 1.0 - ALPHA


def _values(xs: Iterable, who: str) -> list[float]:
    try:
        out = [float(x) for x in xs]
    except (TypeError, ValueError) as e:
        raise TypeError(f"{who}: expected a sequence of numbers; {e}") from None
    if not out:
        raise ValueError(f"{who}: expected at least one value, got none")
    return out


def _finite(vs: list[float]) -> bool:
    return all(math.isfinite(v) for v in vs)


def _scipy_stats():
    return optional_import("scipy.stats", extra="viz", dist="scipy", purpose="attnlab.stats: "
                           "confidence intervals and significance tests")


def mean(xs: Iterable) -> float:
    """The arithmetic mean (correctly rounded; ``inf``/``nan`` as IEEE has it for
    non-finite values). ``ValueError`` if empty."""
    vs = _values(xs, "mean")
    # fmean's exact sum refuses inf and nan; plain float division propagates them
    return statistics.fmean(vs) if _finite(vs) else sum(vs) / len(vs)


def std(xs: Iterable) -> float | None:
    """The sample standard deviation (``n - 1``), ``None`` for a single value, ``nan``
    with a non-finite value."""
    vs = _values(xs, "std")
    if len(vs) < 2:
        return None
    return statistics.stdev(vs) if _finite(vs) else math.nan


@dataclass(frozen=True)
class Interval:
    """A confidence interval of the mean: ``low <= mean <= high``, both ``None`` (and
    :attr:`note` saying why) for a single value or a non-finite one."""

    mean: float
    low: float | None
    high: float | None
    n: int
    confidence: float
    note: str = ""

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2


def confidence_interval(xs: Iterable, confidence: float = CONFIDENCE) -> Interval:
    """The Student-t ``confidence`` interval of the mean of ``xs`` (see the module doc)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a level in (0, 1), got {confidence!r}")
    vs = _values(xs, "confidence_interval")
    m, n = mean(vs), len(vs)
    if n == 1:
        return Interval(m, None, None, 1, confidence, "1 seed: no CI")
    if not _finite(vs):
        return Interval(m, None, None, n, confidence, "non-finite value: no CI")
    s = statistics.stdev(vs)
    half = float(_scipy_stats().t.ppf(0.5 + confidence / 2, n - 1)) * s / math.sqrt(n)
    return Interval(m, m - half, m + half, n, confidence)


@dataclass(frozen=True)
class Difference:
    """The outcome of :func:`welch` for samples ``a`` and ``b``.

    ``diff = mean(a) - mean(b)``; ``p`` is the two-sided p-value (``None`` when
    ``tested`` is False); ``significant`` is ``tested and p < alpha``; ``how`` names the
    test or the rule that decided (see the module docstring)."""

    diff: float
    n_a: int
    n_b: int
    p: float | None
    significant: bool
    tested: bool
    how: str


def welch(a: Iterable, b: Iterable, alpha: float = ALPHA) -> Difference:
    """Welch's two-sample t-test of ``mean(a) != mean(b)``; see the module docstring for
    the samples it cannot test and how they are decided."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha: expected a level in (0, 1), got {alpha!r}")
    xa, xb = _values(a, "welch: a"), _values(b, "welch: b")
    diff = mean(xa) - mean(xb)
    na, nb = len(xa), len(xb)
    if min(na, nb) < 2:
        return Difference(diff, na, nb, None, False, False,
                          f"no test: {min(na, nb)} value on a side (needs 2 each)")
    if not (_finite(xa) and _finite(xb)):
        return Difference(diff, na, nb, None, False, False, "no test: a non-finite value")
    if sorted(xa) == sorted(xb):
        return Difference(0.0, na, nb, 1.0, False, True, "identical samples")
    if len(set(xa)) == 1 and len(set(xb)) == 1:  # scipy: NaN when equal, p = 0 when not
        if xa[0] == xb[0]:
            return Difference(0.0, na, nb, 1.0, False, True, "both constant and equal")
        return Difference(diff, na, nb, 0.0, True, True,
                          "both constant, different values (Welch limit p -> 0)")
    p = float(_scipy_stats().ttest_ind_from_stats(
        statistics.fmean(xa), statistics.stdev(xa), na, statistics.fmean(xb),
        statistics.stdev(xb), nb, equal_var=False).pvalue)
    return Difference(diff, na, nb, p, p < alpha, True, "Welch's t-test")


def format_p(p: float) -> str:
    """A p-value as the report writes it: ``p = 0.41``, ``p = 0.012``, ``p < 0.001``."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"
