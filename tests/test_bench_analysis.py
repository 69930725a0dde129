"""attnlab.bench.analysis and attnlab.bench.plots on synthetic rows.

Rows are built here from known time and memory laws, so every expected number (exponent,
crossover, speedup, ratio) is computed by hand from the law, not by the code under test.
"""

from __future__ import annotations

import io
import math
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from attnlab.bench.analysis import (
    FIT_MIN_N,
    compare_runs,
    crossover,
    fit_exponent,
    format_bytes,
    format_time,
    pareto_front,
    render_compare,
    render_table,
    summarise,
)

NS = [256, 512, 1024, 2048, 4096, 8192, 16384]
CFG = dict(batch=1, heads=4, head_dim=32, dtype="float32", pass_="fwd", causal=False,
           device="cpu")


def make_rows(label, time_fn, mem_fn=lambda n: 1000 * n, ns=NS, status=None, mechanism=None,
              error=1e-3, **cfg):
    """Rows for one label: ``time_fn(N)`` seconds and ``mem_fn(N)`` bytes at every N, except
    the lengths in ``status`` (N -> non-ok status), which get no numbers, as the store gives."""
    status = status or {}
    out = []
    for n in ns:
        ok = n not in status
        t = time_fn(n)
        out.append(dict(
            mechanism=mechanism or label.split("(")[0], label=label, hparams={}, N=n,
            **{**CFG, **cfg}, status=status.get(n, "ok"),
            time_s=t if ok else None, time_iqr_s=t / 20 if ok else None,
            peak_mem_bytes=int(mem_fn(n)) if ok else None, flops=4.0 * n * n * 32,
            gflops_per_s=None, roof_fraction=min(1.0, n / 32768) if ok else None,
            error=error if ok else None, message="" if ok else f"{status[n]} at N={n}"))
    return out


def text_of(table, width=300):
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(table)
    return console.file.getvalue()


def line_of(text, label):
    [line] = [ln for ln in text.splitlines() if ln.startswith(f"│ {label} ")]
    return line


# ----------------------------------------------------------------------------- exponents

@given(a=st.floats(0.3, 3.0), log_c=st.floats(-12, 2))
def test_fit_exponent_recovers_a_power_law(a, log_c):
    ys = [10 ** log_c * n ** a for n in NS]
    assert fit_exponent(NS, ys) == pytest.approx(a, abs=1e-9)


def test_fit_exponent_range_and_degenerate_cases():
    # Overhead-dominated (flat) below FIT_MIN_N, quadratic from it on.
    ys = [max(1e-2, 1e-9 * n ** 2) if n < FIT_MIN_N else 1e-9 * n ** 2 for n in NS]
    assert fit_exponent(NS, ys, n_min=4096) == pytest.approx(2.0)
    assert fit_exponent(NS, ys, n_max=1024) == pytest.approx(0.0, abs=1e-12)
    assert fit_exponent(NS, ys) < 1.5  # the flat part pulls an all-points fit down
    assert fit_exponent(NS, ys, n_min=16384) is None  # one point
    assert fit_exponent([512, 512], [1.0, 2.0]) is None  # one distinct length
    assert fit_exponent([256, 512, 1024], [None, 2.0, 4.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same length"):
        fit_exponent([1, 2], [1.0])


def test_summarise_fits_on_long_lengths_when_it_can():
    flat_then_quadratic = lambda n: 1e-2 if n < FIT_MIN_N else 1e-9 * n ** 2  # noqa: E731
    [e] = summarise(make_rows("a", flat_then_quadratic, mem_fn=lambda n: 64 * n ** 1.5))
    assert e["time_exponent"] == pytest.approx(2.0)
    assert e["time_fit_range"] == (4096, 16384)
    assert e["memory_exponent"] == pytest.approx(1.5, abs=1e-3)  # int() rounding of bytes
    # Only one ok length >= 4096: the fit falls back to every ok point.
    [e] = summarise(make_rows("b", lambda n: 1e-6 * n, status={8192: "oom", 16384: "oom"}))
    assert e["time_fit_range"] == (256, 4096)
    assert e["time_exponent"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- crossover

def test_crossover_of_straight_lines_is_exact():
    ns = [1000, 2000, 4000, 8000, 16000, 32000]
    base = [n ** 2 * 1e-9 for n in ns]   # equal at N = 1e-5 / 1e-9 = 1e4
    mech = [n * 1e-5 for n in ns]
    assert crossover(ns, mech, base) == pytest.approx(1e4, rel=1e-12)
    assert crossover(ns[::-1], mech[::-1], base[::-1]) == pytest.approx(1e4, rel=1e-12)


@given(ab=st.floats(1.5, 3.0), am=st.floats(0.5, 1.4), log_ratio=st.floats(-1, 1),
       cross_exp=st.floats(1.3, 5.7))
def test_crossover_recovers_the_analytic_point(ab, am, log_ratio, cross_exp):
    """base = cb N^ab, mech = cm N^am meet at N* = (cm/cb)^(1/(ab-am)): choose N* first."""
    n_star = 10 ** cross_exp
    cb = 10 ** log_ratio
    cm = cb * n_star ** (ab - am)
    ns = [10 ** (k / 4) for k in range(0, 25)]  # 1 .. 1e6, brackets N*
    got = crossover(ns, [cm * n ** am for n in ns], [cb * n ** ab for n in ns])
    assert got == pytest.approx(n_star, rel=1e-9)


def test_crossover_edge_cases():
    ns = [256, 512, 1024, 2048]
    slow, fast = [2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]
    assert crossover(ns, slow, fast) is None                       # never faster
    assert crossover(ns, fast, slow) == 256                        # already faster
    assert crossover(ns, [None, 3.0, 1.0, 1.0], [1.0, 2.0, 2.0, 2.0]) is not None
    assert crossover(ns, [0.5, 3.0, 1.0, 1.0], [None, 2.0, 2.0, 2.0]) > 512  # 256 not common
    assert crossover(ns, [None] * 4, fast) is None
    # Faster, slower, faster again: the first length where it wins.
    assert crossover(ns, [1.0, 3.0, 1.0, 1.0], [2.0] * 4) == 256
    # Slower, faster, slower: still the first crossing, between 256 and 512.
    c = crossover(ns, [4.0, 1.0, 4.0, 4.0], [2.0] * 4)
    assert c == pytest.approx(math.exp((math.log(256) + math.log(512)) / 2))
    with pytest.raises(ValueError, match="same length"):
        crossover(ns, fast, fast[:2])


# ----------------------------------------------------------------------------- summarise

def _run_with_failures():
    return (make_rows("sdpa", lambda n: 1e-9 * n ** 2, mem_fn=lambda n: 4 * n * n, error=1e-7)
            + make_rows("sliding_window(window=256)", lambda n: 1e-5 * n,
                        status={1024: "FAILED"}, error=2e-2)
            + make_rows("reference", lambda n: 3e-9 * n ** 2, status={8192: "oom", 16384: "oom"},
                        error=0.0)
            + make_rows("linformer(k=64)", lambda n: 4e-3 + 1e-7 * n, status={16384: "timeout"}))


def test_summarise_keeps_failures_as_words():
    rows = _run_with_failures()
    # A FAILED row that (wrongly) still carries numbers must not leak them anywhere.
    for r in rows:
        if r["status"] == "FAILED":
            r.update(time_s=0.0777777, peak_mem_bytes=987654321, error=0.75, roof_fraction=0.9)
    s = {e["label"]: e for e in summarise(rows)}
    sw = s["sliding_window(window=256)"]
    assert 1024 not in sw["time"] and 1024 not in sw["memory"] and 1024 not in sw["speedup"]
    assert sw["status"] == {1024: "FAILED"}
    assert sw["max_error"] == pytest.approx(2e-2)      # the FAILED point's 0.75 is not a measurement
    assert sw["best_roof"] == pytest.approx(0.5)        # 16384 / 32768, not the FAILED 0.9
    assert s["reference"]["status"] == {8192: "oom", 16384: "oom"}
    assert set(s["reference"]["time"]) == {256, 512, 1024, 2048, 4096}
    text = text_of(render_table(summarise(rows)))
    assert "77.8 ms" not in text and "942 MiB" not in text and "7.5e-01" not in text
    assert "FAILED" in line_of(text, "sliding_window(window=256)")
    assert line_of(text, "reference").count("OOM") == 3   # two lengths + memory at 16k
    assert "timeout" in line_of(text, "linformer(k=64)")


def test_summarise_baseline_speedup_crossover_and_order():
    s = summarise(_run_with_failures())
    by = {e["label"]: e for e in s}
    sw = by["sliding_window(window=256)"]
    assert sw["baseline"] == "sdpa" and not sw["is_baseline"] and by["sdpa"]["is_baseline"]
    for n, sp in sw["speedup"].items():
        assert sp == pytest.approx(1e-9 * n ** 2 / (1e-5 * n))
    assert sw["crossover"] == pytest.approx(1e4, rel=1e-9)  # N^2 1e-9 = N 1e-5
    assert sw["crossover_note"] == "ok"
    assert by["reference"]["crossover"] is None and by["reference"]["crossover_note"] == "never"
    assert by["sdpa"]["crossover_note"] == "baseline"
    # Largest length every label measured ok: 4096 (8192 oom for reference, 16384 timeout).
    at_4096 = [e["time"][4096] for e in s]
    assert at_4096 == sorted(at_4096)
    text = text_of(render_table(s))
    assert "~10000" in line_of(text, "sliding_window(window=256)")
    assert ">4k" in line_of(text, "reference")  # the last length both measured
    assert "(baseline)" in line_of(text, "sdpa")


def test_summarise_without_baseline_and_config_groups():
    rows = (make_rows("flash", lambda n: 1e-9 * n ** 2)
            + make_rows("flash", lambda n: 3e-9 * n ** 2, pass_="fwd+bwd"))
    s = summarise(rows)
    assert len(s) == 2
    assert all(e["baseline"] is None and e["crossover_note"] == "no baseline" for e in s)
    assert {e["pass_"] for e in s} == {"fwd", "fwd+bwd"}
    text = text_of(render_table(s))
    assert "fwd+bwd" in text
    assert summarise([]) == []
    with pytest.raises(ValueError, match="lacks key"):
        summarise([{"label": "x"}])
    with pytest.raises(ValueError, match="same point"):
        summarise(rows + rows[:1])


def test_render_table_human_units_and_lengths():
    rows = make_rows("sdpa", lambda n: 1.5e-5 * n / 256, mem_fn=lambda n: 1536 * n / 256,
                     ns=[256, 4096])
    text = text_of(render_table(summarise(rows), lengths=[256, 4096]))
    line = line_of(text, "sdpa")
    assert "15.0 us" in line and "240 us" in line and "24.0 KiB" in line
    assert "N=4k" in text and "mem @ 4k" in text


@pytest.mark.parametrize("seconds, text", [
    (1.5e-5, "15.0 us"), (1.234e-3, "1.23 ms"), (0.9996e-3, "1.00 ms"), (2.5, "2.50 s"),
    (123.4, "123 s"), (4.2e-8, "42.0 ns")])
def test_format_time(seconds, text):
    assert format_time(seconds) == text


@pytest.mark.parametrize("nbytes, text", [
    (512, "512 B"), (1536, "1.50 KiB"), (12 * 2**20, "12.0 MiB"), (3 * 2**30, "3.00 GiB")])
def test_format_bytes(nbytes, text):
    assert format_bytes(nbytes) == text


# ----------------------------------------------------------------------------- pareto

def test_pareto_front_by_hand():
    pts = [(1.0, 5.0), (2.0, 1.0), (3.0, 3.0), (0.5, 9.0), (2.0, 1.0)]
    assert pareto_front(pts) == [3, 0, 1, 4]


@given(st.lists(st.tuples(st.integers(1, 20), st.integers(1, 20)), min_size=1, max_size=25))
def test_pareto_front_properties(pts):
    front = set(pareto_front(pts))

    def dominates(p, q):
        return p[0] <= q[0] and p[1] <= q[1] and p != q

    assert front
    for i in front:
        assert not any(dominates(p, pts[i]) for p in pts)
    for i in set(range(len(pts))) - front:
        assert any(dominates(pts[j], pts[i]) for j in front)


# ----------------------------------------------------------------------------- compare

def test_compare_runs_ratios_and_statuses():
    a = make_rows("flash", lambda n: 1e-9 * n ** 2, mem_fn=lambda n: 100 * n, ns=[512, 1024, 2048])
    b = make_rows("flash", lambda n: 0.5e-9 * n ** 2, mem_fn=lambda n: 300 * n, ns=[512, 1024, 4096],
                  status={1024: "oom"})
    c = {e["N"]: e for e in compare_runs(a, b)}
    assert sorted(c) == [512, 1024, 2048, 4096]
    assert c[512]["time_ratio"] == pytest.approx(0.5)
    assert c[512]["mem_ratio"] == pytest.approx(3.0)
    assert (c[1024]["status_a"], c[1024]["status_b"], c[1024]["time_ratio"]) == ("ok", "oom", None)
    assert c[2048]["status_b"] is None and c[4096]["status_a"] is None
    text = text_of(render_compare(compare_runs(a, b), "old", "new"))
    assert "0.50x" in text and "3.00x" in text and "OOM" in text and "absent" in text
    # Different configurations never match.
    assert all(e["time_ratio"] is None for e in compare_runs(a, make_rows(
        "flash", lambda n: 1e-9, ns=[512], dtype="float16")))
    with pytest.raises(ValueError, match="rows_b has two rows"):
        compare_runs(a, b + b[:1])


# ----------------------------------------------------------------------------- plots

META = {"run_id": 42, "machine": {"cpu": "Test CPU 9000", "cores": 2, "ram_gib": 8.0,
                                  "gpu": None, "roof_gflops": 100.0},
        "versions": {"python": "3.11", "torch": "2.13.0", "attnlab": "0.1.0"},
        "commit": "abcdef1234567890", "command": "attnlab bench", "profile": None}
KINDS = ("time_vs_n", "memory_vs_n", "speedup_vs_n", "pareto_error_time", "roof_vs_n")


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    pytest.importorskip("matplotlib")
    from attnlab.bench.plots import plot_run

    rows = (_run_with_failures()
            + make_rows("sdpa", lambda n: 2e-9 * n ** 2, ns=NS[:3], pass_="fwd+bwd", causal=True)
            + make_rows("linear", lambda n: 2e-6 * n, ns=NS[:3], pass_="fwd+bwd", causal=True)
            # A configuration where nothing ran: no figure for it.
            + make_rows("sdpa", lambda n: 1.0, ns=NS[:2], dtype="float16",
                        status={256: "unsupported", 512: "unsupported"}))
    out = tmp_path_factory.mktemp("plots")
    return out, plot_run(rows, META, out / "sub")


def test_plot_run_writes_every_figure_of_every_group(plotted):
    out, paths = plotted
    assert len(paths) == len(set(paths)) == 2 * len(KINDS) * 2
    for stem in ("fwd-noncausal-float32-B1-H4-D32-cpu", "fwd_bwd-causal-float32-B1-H4-D32-cpu"):
        for kind in KINDS:
            png = out / "sub" / f"{kind}-{stem}.png"
            svg = out / "sub" / f"{kind}-{stem}.svg"
            assert png in paths and svg in paths
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert "<svg" in svg.read_text()
    assert not list((out / "sub").glob("*float16*"))


def test_plot_legends_carry_exponents_statuses_and_run_info(plotted):
    out, _ = plotted
    svg = (out / "sub" / "time_vs_n-fwd-noncausal-float32-B1-H4-D32-cpu.svg").read_text()
    assert "sdpa  N^2.00" in svg
    assert "sliding_window(window=256)  N^1.00  [FAILED 1k]" in svg
    assert "reference  N^2.00  [OOM 8k,16k]" in svg
    assert "linformer(k=64)" in svg and "[timeout 16k]" in svg
    assert "Test CPU 9000 (2 cores)" in svg and "torch 2.13.0" in svg
    assert "abcdef1234" in svg and "run 42" in svg
    mem = (out / "sub" / "memory_vs_n-fwd-noncausal-float32-B1-H4-D32-cpu.svg").read_text()
    assert "sdpa  N^2.00" in mem and "[OOM 8k,16k]" in mem
    speed = (out / "sub" / "speedup_vs_n-fwd-noncausal-float32-B1-H4-D32-cpu.svg").read_text()
    assert "crosses at ~10000" in speed and "reference  never faster" in speed
    # Pareto at the largest N with >= 2 ok labels (16k): reference (oom) is listed, not dropped.
    pareto = (out / "sub" / "pareto_error_time-fwd-noncausal-float32-B1-H4-D32-cpu.svg").read_text()
    assert "N=16k" in pareto and "reference  [OOM at 16k]" in pareto
    assert "linformer(k=64)  [timeout at 16k]" in pareto


def test_plot_run_rejects_empty_input_and_names_the_extra(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from attnlab.bench.plots import plot_run

    with pytest.raises(ValueError, match="rows is empty"):
        plot_run([], META, tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"attnlab.bench.plots needs `matplotlib`.*\.\[viz\]"):
        plot_run(make_rows("sdpa", lambda n: 1.0, ns=[256]), META, tmp_path)
