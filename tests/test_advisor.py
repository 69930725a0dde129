"""attnlab.report.advisor on small synthetic tables.

Every expected number is computed here by hand from the law the rows were built from (or
from the interpolation formula written out in the test), never by the code under test.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnlab.report.advisor import Advice, advise, answers, fit_rows, render_advice

scipy_stats = pytest.importorskip("scipy.stats")

MIB = 2**20


def rows(name, points, *, status=None, pass_="fwd+bwd", causal=False, mechanism=None,
         label=True):
    """Bench rows for one mechanism: ``points`` is N -> (time_s, peak_mem_bytes); ``status``
    N -> non-ok status (those rows carry no numbers, as the store gives them)."""
    out = []
    for n in sorted({*points, *(status or {})}):
        st_ = (status or {}).get(n, "ok")
        t, m = points.get(n, (None, None)) if st_ == "ok" else (None, None)
        r = dict(mechanism=mechanism or name, N=n, pass_=pass_, causal=causal, dtype="float32",
                 status=st_, time_s=t, peak_mem_bytes=m, roof_fraction=None)
        if label:
            r["label"] = name
        out.append(r)
    return out


def law(c_t, a_t, c_m, a_m, ns):
    """Points of the power laws t = c_t N^a_t seconds, mem = c_m N^a_m bytes."""
    return {n: (c_t * n**a_t, c_m * n**a_m) for n in ns}


def fit(advice: Advice, name: str) -> dict:
    return next(f for f in advice.fits if f["name"] == name)


def reason(advice: Advice, name: str) -> str:
    return next(e["reason"] for e in advice.excluded if e["name"] == name)


# ----------------------------------------------------------------------- time and memory at N

def test_measured_point_is_taken_as_is():
    a = advise(rows("x", {1024: (0.002, 5 * MIB), 2048: (0.008, 20 * MIB)}), 2048)
    f = fit(a, "x")
    assert (f["time_s"], f["peak_mem_bytes"], f["estimate"]) == (0.008, 20 * MIB, "measured")
    assert a.fastest == a.recommended == "x" and a.most_accurate is None


def test_interpolation_is_log_log_between_the_two_nearest_lengths():
    # 512 and 8192 are further away and off the segment's law: they must not be used
    pts = {512: (1.0, 1.0 * MIB), 1024: (0.001, 4 * MIB), 4096: (0.009, 10 * MIB),
           8192: (5.0, 999 * MIB)}
    a = advise(rows("x", pts), 3000)
    f = fit(a, "x")
    frac = (math.log(3000) - math.log(1024)) / (math.log(4096) - math.log(1024))
    t = math.exp(math.log(0.001) + frac * (math.log(0.009) - math.log(0.001)))
    m = math.exp(math.log(4 * MIB) + frac * (math.log(10 * MIB) - math.log(4 * MIB)))
    assert f["time_s"] == pytest.approx(t, rel=1e-12)
    assert f["peak_mem_bytes"] == pytest.approx(m, rel=1e-12)
    assert f["estimate"] == "interpolated"
    # and a midpoint by hand: the geometric mean of the two ends
    g = fit(advise(rows("x", pts), 2048), "x")
    assert g["time_s"] == pytest.approx(math.sqrt(0.001 * 0.009), rel=1e-12)
    line = next(r for r in a.reasoning if r.startswith("x:"))
    assert "interpolated" in line and "N=1024" in line and "N=4096" in line


@given(st.floats(0.5, 3.0), st.floats(1e-9, 1e-3), st.integers(256, 16384))
def test_interpolating_a_power_law_recovers_it(a_t, c_t, n):
    pts = law(c_t, a_t, 100.0, 1.0, [256, 1024, 4096, 16384])
    f = fit(advise(rows("x", pts), n), "x")
    assert f["time_s"] == pytest.approx(c_t * n**a_t, rel=1e-9)
    assert f["peak_mem_bytes"] == pytest.approx(100.0 * n, rel=1e-9)


def test_extrapolation_above_uses_the_exponent_of_the_large_lengths():
    # N^2 for N >= 4096; the 1024 point is overhead-dominated and would bend a fit on all
    pts = {1024: (0.5, 1 * MIB), **law(1e-9, 2.0, 64.0, 1.0, [4096, 8192])}
    a = advise(rows("x", pts), 32768)
    f = fit(a, "x")
    assert f["time_s"] == pytest.approx(1e-9 * 8192**2 * 4**2, rel=1e-9)
    assert f["peak_mem_bytes"] == pytest.approx(64.0 * 32768, rel=1e-9)
    assert f["estimate"] == f["time_estimate"] == "extrapolated"
    line = next(r for r in a.reasoning if r.startswith("x:"))
    assert "EXTRAPOLATED" in line and "N^2.00" in line and "N=8192" in line


def test_extrapolation_above_caps_a_steeper_than_quadratic_fit():
    # memory 0.1 MiB -> 16 MiB over 256..1024 (allocator granularity) fits N^3.66; at 4096
    # a quadratic from the 1024 point: 16 MiB * 4^2 = 256 MiB, not 16 MiB * 4^3.66
    pts = {256: (1e-3, 0.1 * MIB), 512: (4e-3, 2 * MIB), 1024: (16e-3, 16 * MIB)}
    a = advise(rows("x", pts), 4096)
    f = fit(a, "x")
    assert f["peak_mem_bytes"] == pytest.approx(16 * MIB * 16, rel=1e-9)
    assert f["time_s"] == pytest.approx(16e-3 * 16, rel=1e-9)  # fitted 2.00: not capped
    line = next(r for r in a.reasoning if r.startswith("x:"))
    assert "capped from the fitted 3.66" in line and line.count("capped") == 1
    # a steep fit below the data is the first segment, never capped (it is not scaling up)
    assert fit(advise(rows("x", pts), 128), "x")["peak_mem_bytes"] == pytest.approx(
        0.1 * MIB / 20, rel=1e-6)


def test_extrapolation_below_uses_the_first_segment():
    # slope 1 between 1024 and 2048, slope 2 above: 512 follows the first segment
    pts = {1024: (1.0, 100), 2048: (2.0, 200), 4096: (8.0, 800)}
    f = fit(advise(rows("x", pts), 512), "x")
    assert f["time_s"] == pytest.approx(0.5) and f["peak_mem_bytes"] == pytest.approx(50)
    assert f["estimate"] == "extrapolated"


def test_one_length_only_cannot_be_estimated_elsewhere():
    pts = {1024: (1.0, 100)}
    assert fit(advise(rows("x", pts), 1024), "x")["time_s"] == 1.0
    a = advise(rows("x", pts), 2048)
    assert a.fits == [] and "1024" in reason(a, "x") and a.recommended is None


def test_estimate_is_the_less_certain_of_time_and_memory():
    # memory not measured at 2048 (a CPU run without peak memory there): interpolated
    r = rows("x", {1024: (1.0, 100), 2048: (2.0, None), 4096: (4.0, 400)})
    f = fit(advise(r, 2048), "x")
    assert (f["time_estimate"], f["mem_estimate"], f["estimate"]) == \
        ("measured", "interpolated", "interpolated")
    assert f["peak_mem_bytes"] == pytest.approx(200)


# ------------------------------------------------------------------------------ exclusions

@pytest.mark.parametrize("bad", ["oom", "timeout"])
def test_oom_or_timeout_at_or_below_n_excludes(bad):
    r = rows("x", {1024: (1.0, 100), 2048: (2.0, 200)}, status={4096: bad})
    for n in (4096, 8192):
        a = advise(r, n)
        assert a.fits == [] and reason(a, "x") == f"{bad} at N=4096 <= {n}"
    # below the failing length it still runs, and the failing row is not a data point
    assert fit(advise(r, 2048), "x")["time_s"] == 2.0
    assert advise(r, 3000).excluded == []


def test_failed_gate_excludes_at_any_length_and_other_statuses_only_at_n():
    r = rows("x", {1024: (1.0, 100), 2048: (2.0, 200)}, status={8192: "FAILED"})
    assert "FAILED" in reason(advise(r, 1024), "x")
    r = rows("y", {1024: (1.0, 100), 4096: (4.0, 400)}, status={2048: "unsupported"})
    assert reason(advise(r, 2048), "y") == "unsupported at N=2048"
    assert fit(advise(r, 4096), "y")["time_s"] == 4.0


def test_budget_excludes_with_both_numbers_in_mib():
    r = rows("big", {1024: (1.0, 12 * MIB)}) + rows("edge", {1024: (2.0, 8 * MIB)})
    a = advise(r, 1024, 8 * MIB)
    why = reason(a, "big")
    assert "12.0 MiB (measured)" in why and "8.0 MiB" in why and "by 4.0 MiB" in why
    # an estimated need says so in the reason too
    big = rows("big", {1024: (1.0, 12 * MIB), 2048: (2.0, 24 * MIB)})
    assert "48.0 MiB (extrapolated from N=1024..2048) > budget" in reason(
        advise(big, 4096, 8 * MIB), "big")
    assert [f["name"] for f in a.fits] == ["edge"]  # exactly at the budget fits
    assert a.recommended == "edge"
    assert advise(r, 1024).fastest == "big"  # no budget, no exclusion
    assert advise(r, 1024, 0).fits == []


def test_unknown_memory_under_a_budget_is_excluded():
    r = rows("x", {1024: (1.0, None), 2048: (2.0, None)})
    assert fit(advise(r, 1024), "x")["peak_mem_bytes"] is None
    assert "memory not measured" in reason(advise(r, 1024, MIB), "x")


def test_no_data():
    assert advise([], 1024) == Advice(1024, None, [], [], None, None, None,
                                      advise([], 1024).reasoning)
    a = advise(rows("x", {}, status={1024: "skipped"}), 2048)
    assert reason(a, "x").startswith("no data") and a.recommended is None


def test_rows_of_another_pass_or_causality_are_ignored():
    r = (rows("x", {1024: (1.0, 100)}, pass_="fwd")
         + rows("x", {1024: (9.0, 900)}, causal=1)  # the store gives causal as 0/1
         + rows("x", {1024: (3.0, 300)}))
    assert fit(advise(r, 1024), "x")["time_s"] == 3.0
    assert fit(advise(r, 1024, pass_="fwd"), "x")["time_s"] == 1.0
    assert fit(advise(r, 1024, causal=True), "x")["time_s"] == 9.0


def test_label_names_the_mechanism_else_mechanism():
    r = rows("performer(m=64)", {1024: (1.0, 1)}, mechanism="performer") + \
        rows("linear", {1024: (2.0, 1)}, label=False)
    q = {"performer": {"mean": 0.9, "std": 0.0, "metric": "accuracy", "mode": "max"}}
    a = advise(r, 1024, quality=q)
    assert [f["name"] for f in a.fits] == ["performer(m=64)", "linear"]
    assert fit(a, "performer(m=64)")["quality"] == q["performer"]  # quality by mechanism
    assert fit(a, "linear")["quality"] is None


# --------------------------------------------------------------------------------- choosing

def three(qa, qb, qc, mode):
    """a fastest, b, c slowest; qualities qa, qb, qc."""
    r = (rows("a", {1024: (1.0, 1)}) + rows("b", {1024: (2.0, 1)})
         + rows("c", {1024: (3.0, 1)}))
    q = {k: {"mean": v, "std": 0.001, "metric": "m", "mode": mode}
         for k, v in zip("abc", (qa, qb, qc), strict=True)}
    return advise(r, 1024, quality=q)


def test_quality_max_mode():
    # best c = 0.91, limit 0.91 - 0.0091 = 0.9009: b (0.905) is close enough, a (0.90) not
    a = three(0.90, 0.905, 0.91, "max")
    assert (a.fastest, a.most_accurate, a.recommended) == ("a", "c", "b")
    assert any("0.9009" in line for line in a.reasoning)


def test_quality_min_mode():
    # best a = 0.90 (lowest), limit 0.909: a and b are close; a is the faster
    a = three(0.90, 0.905, 0.91, "min")
    assert (a.most_accurate, a.recommended) == ("a", "a")
    # best c = 10 (lowest), limit 10.1: b (10.2) is not close, so c itself
    a = three(11.0, 10.2, 10.0, "min")
    assert (a.most_accurate, a.recommended) == ("c", "c")
    a = three(11.0, 10.1, 10.0, "min")  # exactly at the limit counts as close
    assert a.recommended == "b"


def test_tolerance_boundary_in_max_mode_is_inclusive():
    assert three(1.0, 198.0, 200.0, "max").recommended == "b"   # 200 - 2 = 198
    assert three(1.0, 197.9, 200.0, "max").recommended == "c"


def test_ties_go_to_the_faster_then_the_name():
    r = rows("ba", {1024: (1.0, 1)}) + rows("ab", {1024: (1.0, 1)})
    assert advise(r, 1024).fastest == "ab"
    a = three(0.9, 0.9, 0.9, "max")
    assert (a.most_accurate, a.recommended) == ("a", "a")
    a = three(0.5, 0.9, 0.9, "max")
    assert (a.most_accurate, a.recommended) == ("b", "b")


def test_fits_without_quality_are_not_recommended_when_others_have_it():
    r = rows("fast", {1024: (1.0, 1)}) + rows("slow", {1024: (2.0, 1)})
    a = advise(r, 1024, quality={"slow": {"mean": 0.5, "mode": "max"}})
    assert (a.fastest, a.most_accurate, a.recommended) == ("fast", "slow", "slow")


def test_reasoning_mentions_the_numbers():
    r = (rows("a", {1024: (0.001, 4 * MIB), 4096: (0.016, 64 * MIB)})
         + rows("b", {1024: (0.002, 2 * MIB)}, status={2048: "oom"}))
    a = advise(r, 4096, 100 * MIB, quality={"a": {"mean": 0.8, "std": 0.01, "mode": "max",
                                                  "metric": "accuracy"}})
    text = "\n".join(a.reasoning)
    for s in ("N=4096", "100.0 MiB", "16.0 ms", "64.0 MiB", "oom at N=2048", "accuracy 0.8",
              "fastest: a"):
        assert s in text, s


# ----------------------------------------------------------------------- errors and rendering

@pytest.mark.parametrize("kw, arg", [
    (dict(n=0), "n"), (dict(n=2.5), "n"), (dict(n=True), "n"),
    (dict(memory_budget_bytes=-1), "memory_budget_bytes"), (dict(pass_="bwd"), "pass_"),
    (dict(quality={"x": {"mean": 1.0, "mode": "best"}}), "quality"),
    (dict(quality={"x": {"mean": 1.0, "mode": "max", "values": 0.5}}), "quality"),
    (dict(quality={"x": {"mean": 1.0, "mode": "max", "values": ["a"]}}), "quality"),
])
def test_errors_name_the_argument(kw, arg):
    kw = {"n": 1024, **kw}
    with pytest.raises(ValueError, match=rf"^{arg}"):
        advise(rows("x", {1024: (1.0, 1)}), **kw)


def test_duplicate_points_and_mixed_quality_modes_are_refused():
    with pytest.raises(ValueError, match="two rows for 'x' at N=1024"):
        advise(rows("x", {1024: (1.0, 1)}) * 2, 1024)
    r = rows("x", {1024: (1.0, 1)}) + rows("y", {1024: (1.0, 1)})
    q = {"x": {"mean": 1.0, "mode": "max"}, "y": {"mean": 1.0, "mode": "min"}}
    with pytest.raises(ValueError, match="quality"):
        advise(r, 1024, quality=q)


def test_render_advice_markdown():
    r = (rows("a|b", {1024: (0.001, 4 * MIB), 4096: (0.016, 64 * MIB)})
         + rows("sdpa", {1024: (0.002, 2 * MIB)}, status={2048: "oom"}))
    md = render_advice(advise(r, 8192, quality={"sdpa": {"mean": 0.9, "mode": "max"}}))
    assert md.startswith("## Advice at N=8k (memory budget: none)")
    assert ("| a\\|b | 64.0 ms (extrapolated from N=1024..4096) | 256.0 MiB (extrapolated from "
            "N=1024..4096) | **extrapolated** | - |") in md
    assert "- sdpa: oom at N=2048 <= 8192" in md
    assert "- **Recommended**: a|b" in md and "- **Most accurate**: -" in md
    assert "### Reasoning" in md


# ------------------------------------------------------------ quality by significant differences

def seeded(values: dict, mode="max"):
    """a fastest, b, c slowest (as in three()), each with per-seed results ``values``."""
    r = (rows("a", {1024: (1.0, 1)}) + rows("b", {1024: (2.0, 1)})
         + rows("c", {1024: (3.0, 1)}))
    q = {k: {"mean": sum(v) / len(v), "std": None, "metric": "accuracy", "mode": mode,
             "values": v} for k, v in values.items()}
    return advise(r, 1024, quality=q)


def test_recommended_is_the_fastest_not_significantly_worse_than_the_best():
    # c is best by mean (0.91); b is 2.2% behind, but its seeds spread widely: no finding
    # (the old 1% rule would have dropped it); a is behind by as much with a tight spread
    vals = {"a": [0.886, 0.888, 0.890], "b": [0.80, 0.99, 0.88], "c": [0.909, 0.910, 0.911]}
    adv = seeded(vals)
    pa = scipy_stats.ttest_ind(vals["a"], vals["c"], equal_var=False).pvalue
    pb = scipy_stats.ttest_ind(vals["b"], vals["c"], equal_var=False).pvalue
    assert pa < 0.05 <= pb
    assert (adv.fastest, adv.most_accurate, adv.recommended) == ("a", "c", "b")
    assert fit(adv, "a")["vs_best"]["p"] == pytest.approx(pa)
    assert not fit(adv, "a")["vs_best"]["as_good"] and fit(adv, "b")["vs_best"]["as_good"]
    text = "\n".join(adv.reasoning)
    assert pa < 0.001  # written as such
    assert "a 0.888: significantly worse than c (Welch, p < 0.001, 3 vs 3 seeds)" in text
    assert f"b 0.89: not significantly worse than c (Welch, p = {pb:.2g}, 3 vs 3 seeds)" in text
    rec = dict(answers(adv))["Recommended"]
    assert rec.startswith("b: 2.00 s (measured)") and "not significantly worse than c" in rec


def test_min_mode_tests_in_the_other_direction():
    vals = {"a": [0.886, 0.888, 0.890], "b": [0.80, 0.99, 0.88], "c": [0.909, 0.910, 0.911]}
    adv = seeded(vals, mode="min")  # lower is better: a is best and the fastest
    assert (adv.most_accurate, adv.recommended) == ("a", "a")
    assert not fit(adv, "c")["vs_best"]["as_good"]  # significantly higher = worse
    assert fit(adv, "b")["vs_best"]["as_good"]


def test_identical_seeds_are_as_accurate_whatever_the_means_look_like():
    adv = seeded({"a": [0.5, 0.6], "b": [0.5, 0.6], "c": [0.5, 0.6]})
    assert adv.recommended == "a" and fit(adv, "b")["vs_best"]["p"] == 1.0


def test_too_few_seeds_for_a_test_is_said_in_the_answer():
    adv = seeded({"a": [0.905], "b": [0.80, 0.81], "c": [0.91, 0.912]})
    va = fit(adv, "a")["vs_best"]
    assert va["tested"] is False and va["as_good"]  # untested: 1% margin on the means
    assert "untested (1 seed on a side, a test needs 2 each)" in va["text"]
    assert "no significance finding" in va["text"]
    rec = dict(answers(adv))["Recommended"]
    assert rec.startswith("a: ") and "untested" in rec and "(1 seed: no CI)" in rec
    assert "too few seeds to test a against the most accurate" in rec
    assert fit(adv, "b")["vs_best"]["tested"] and not fit(adv, "b")["vs_best"]["as_good"]
    # no per-seed values at all: the same fallback, said so
    adv = three(0.90, 0.905, 0.91, "max")
    assert "no per-seed results" in fit(adv, "b")["vs_best"]["text"]


# ------------------------------------------------- every figure says how it was obtained

LENGTHS = [256, 512, 1024, 2048, 4096, 8192]


def expected_label(n, measured):
    if n in measured:
        return "measured"
    return "interpolated" if min(measured) < n < max(measured) else "extrapolated"


@given(st.sets(st.sampled_from(LENGTHS), min_size=2), st.integers(128, 40000),
       st.floats(1.0, 2.0), st.booleans(), st.floats(1e-9, 1e-6))
def test_no_extrapolated_or_interpolated_figure_is_labelled_measured(ns, n, a_t, gap, c_t):
    ns = sorted(ns)
    pts = law(c_t, a_t, 64.0, 1.0, ns)
    if gap:  # memory not measured at one length: its label may differ from time's
        pts[ns[0]] = (pts[ns[0]][0], None)
    adv = advise(rows("x", pts), n, quality={"x": {"mean": 0.5, "mode": "max",
                                                   "values": [0.5, 0.6]}})
    f = fit(adv, "x")
    mem_ns = ns[1:] if gap else ns
    want_t, want_m = expected_label(n, ns), expected_label(n, mem_ns)
    if len(mem_ns) < 2 and n not in mem_ns:  # one memory point: no estimate elsewhere
        want_m = None
    (row,) = fit_rows(adv)
    for cell, want, label in ((row[1], want_t, f["time_label"]),
                              (row[2], want_m, f["mem_label"])):
        if want is None:
            assert cell == "-" and label is None
            continue
        assert label.startswith(want) and cell.endswith(f"({label})") and cell.count("(") == 1
        assert ("measured" in cell) == (want == "measured")
    # the answers, the reasoning about x and the Markdown: "measured" only where it was
    shown = [t for _, t in answers(adv)] + [render_advice(adv)] + [
        line for line in adv.reasoning if line.startswith(("x:", "fastest", "recommended"))]
    if "measured" not in (want_t, want_m):
        assert not any("(measured" in t or "measured at" in t for t in shown)
    if want_t == "extrapolated":
        assert "EXTRAPOLATED" in next(line for line in adv.reasoning if line.startswith("x:"))
        assert all("extrapolated from N=" in t for _, t in answers(adv))
