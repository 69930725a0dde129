"""The leaderboard: per-mechanism speed and quality, checked against hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnlab.report.leaderboard import leaderboard, render_leaderboard

scipy_stats = pytest.importorskip("scipy.stats")


def m(label, n, t, *, mem=None, status="ok", mechanism=None, pass_="fwd", causal=False,
      roof=None):
    return {"mechanism": mechanism or label, "label": label, "N": n, "pass_": pass_,
            "causal": causal, "dtype": "float32", "status": status,
            "time_s": t if status == "ok" else None,
            "peak_mem_bytes": mem if status == "ok" else None,
            "roof_fraction": roof if status == "ok" else None, "error": None}


def tr(mech, seed, test, *, model="transformer", metric="accuracy", mode="max", step=None,
       time=None, params=1000, thr=None):
    return {"mechanism": mech, "model": model, "seed": seed, "metric": metric, "mode": mode,
            "test_value": test, "best_validation": test, "parameters": params,
            "train_time_s": 1.0, "throughput": thr,
            "summary": {"convergence": {"step": step, "time": time}, "test": {metric: test}},
            "run_dir": f"runs/{model}-{mech}-{seed}"}


def by_name(rows):
    return {r["name"]: r for r in rows}


def test_means_stds_and_training_figures_by_hand():
    ms = [m("sdpa", 1024, 1e-3), m("performer", 1024, 2e-3)]
    ts = [tr("performer", 0, 0.5, step=100, time=10.0, thr=200.0),
          tr("performer", 1, 0.7, step=300, time=30.0, thr=400.0),
          tr("performer", 2, 0.9, step=200, time=20.0, thr=600.0),
          tr("sdpa", 0, 0.8, step=50, time=5.0, thr=1000.0)]
    rows = by_name(leaderboard(ms, ts))
    p = rows["performer"]
    # mean (0.5+0.7+0.9)/3 = 0.7; sample var ((0.2)^2+0+(0.2)^2)/2 = 0.04 -> std 0.2
    assert p["test_mean"] == pytest.approx(0.7)
    assert p["test_std"] == pytest.approx(0.2)
    assert p["n_seeds"] == 3
    assert p["convergence_step"] == pytest.approx(200.0)
    assert p["convergence_time"] == pytest.approx(20.0)
    assert p["throughput"] == pytest.approx(400.0)
    assert p["parameters"] == 1000
    s = rows["sdpa"]
    assert s["n_seeds"] == 1 and s["test_mean"] == pytest.approx(0.8)
    assert s["test_std"] is None  # one seed says nothing about the spread


@pytest.mark.parametrize("mode,order", [("max", ["b", "a", "c"]), ("min", ["c", "a", "b"])])
def test_sorted_by_quality_respecting_mode_then_untrained_by_time(mode, order):
    ms = [m(x, n, t) for x, ts in {"a": (1, 2), "b": (3, 4), "c": (5, 6), "fast": (9, 0.6),
                                   "slow": (7, 8)}.items() for n, t in zip((512, 1024), ts, strict=True)]
    # "fast" loses at 512 but wins at 1024, the largest length both measured ok; 2048 is
    # not common, so it does not count
    ms.append(m("slow", 2048, 30.0))
    ms.append(m("fast", 2048, None, status="oom"))
    trains = [tr("a", 0, 0.5, mode=mode), tr("b", 0, 0.9, mode=mode), tr("c", 0, 0.1, mode=mode)]
    names = [r["name"] for r in leaderboard(ms, trains)]
    assert names == order + ["fast", "slow"]


def test_statuses_are_text_never_numbers():
    ms = [m("x", 512, 1e-3, mem=2 * 2**20), m("x", 1024, None, status="oom"),
          m("x", 2048, None, status="FAILED")]
    (row,) = leaderboard(ms, [])
    assert row["time"] == {512: 1e-3, 1024: "oom", 2048: "FAILED"}
    assert row["memory"] == {512: 2 * 2**20, 1024: "oom", 2048: "FAILED"}
    cols, cells = render_leaderboard([row], [512, 1024, 2048, 4096])
    c = dict(zip(cols, cells[0], strict=True))
    assert c["time N=512"] == "1.00 ms"
    assert c["time N=1k"] == "OOM" and c["time N=2k"] == "FAILED"
    assert c["mem N=512"] == "2.0 MiB" and c["mem N=1k"] == "OOM"
    assert c["time N=4k"] == "-"


def test_baseline_models_get_their_own_rows_without_bench_figures():
    ms = [m("sdpa", 1024, 1e-3)]
    ts = [tr("none", 0, 0.6, model="lstm"), tr("none", 1, 0.8, model="lstm"),
          tr("sdpa", 0, 0.7)]
    rows = leaderboard(ms, ts)
    assert [r["name"] for r in rows] == ["lstm", "sdpa"]
    lstm = rows[0]
    assert lstm["model"] == "lstm" and lstm["time"] == {} and lstm["memory"] == {}
    assert lstm["time_exponent"] is None and lstm["crossover"] is None
    assert lstm["test_mean"] == pytest.approx(0.7)
    assert lstm["test_std"] == pytest.approx(math.sqrt(0.02))
    cols, cells = render_leaderboard(rows, [1024])
    c = dict(zip(cols, cells[0], strict=True))
    assert c["mechanism"] == "lstm (baseline)" and c["time N=1k"] == "-"
    # mean ± half-width of the 95% t-interval: 2 seeds, s = sqrt(0.02), sem = s / sqrt(2) = 0.1
    lo, hi = scipy_stats.t.interval(0.95, 1, loc=0.7, scale=0.1)
    assert c["test accuracy"] == f"0.7 ± {(hi - lo) / 2:.2g}" == "0.7 ± 1.3"


def test_training_matched_by_mechanism_when_label_differs():
    ms = [m("reformer[b=4]", 1024, 1e-3, mechanism="reformer")]
    rows = leaderboard(ms, [tr("reformer", 0, 0.4), tr("linformer", 0, 0.3)])
    assert {r["name"]: r["test_mean"] for r in rows} == {"reformer[b=4]": 0.4,
                                                        "linformer": 0.3}


def test_exponent_crossover_and_roof_of_power_laws():
    ns = [1024, 2048, 4096, 8192, 16384]
    # sdpa t = 1e-9 N^2, linear t = 1e-6 N^1.1: equal where N^0.9 = 1000, N = 1000^(1/0.9)
    ms = [m("sdpa", n, 1e-9 * n**2, roof=0.1 * i) for i, n in enumerate(ns)]
    ms += [m("linear", n, 1e-6 * n**1.1, roof=0.5) for n in ns]
    ms.append(m("linear", 32768, None, status="timeout"))
    # overhead-bound below FIT_MIN_N: flat, then t = 1e-9 N^2; the fit must skip the flat part
    ms += [m("overhead", n, max(1e-9 * n**2, 0.01)) for n in ns]
    rows = by_name(leaderboard(ms, []))
    # fitted on N >= 4096 (FIT_MIN_N): exact for a power law
    assert rows["sdpa"]["time_exponent"] == pytest.approx(2.0)
    assert rows["linear"]["time_exponent"] == pytest.approx(1.1)
    assert rows["overhead"]["time_exponent"] == pytest.approx(2.0)
    assert rows["linear"]["crossover"] == pytest.approx(1000 ** (1 / 0.9), rel=1e-9)
    assert rows["sdpa"]["crossover_note"] == "baseline"
    assert rows["sdpa"]["roof_fraction"] == pytest.approx(0.4) and rows["sdpa"]["roof_N"] == 16384
    assert rows["linear"]["roof_N"] == 16384  # the timeout at 32k is not the largest ok N
    cols, cells = render_leaderboard(list(rows.values()), ns)
    c = dict(zip(cols, cells[list(rows).index("linear")], strict=True))
    assert c["t ~ N^a"] == "1.10" and c["crossover vs sdpa"] == "~2150"  # format_length: 3 significant digits of 2154.4


def test_pass_and_causal_filter_and_duplicates_rejected():
    ms = [m("x", 512, 1.0), m("x", 512, 9.0, pass_="fwd+bwd"), m("x", 512, 5.0, causal=True)]
    assert leaderboard(ms, [])[0]["time"] == {512: 1.0}
    assert leaderboard(ms, [], pass_="fwd+bwd")[0]["time"] == {512: 9.0}
    assert leaderboard(ms, [], causal=True)[0]["time"] == {512: 5.0}
    with pytest.raises(ValueError, match="N=512"):
        leaderboard(ms + [m("x", 512, 2.0)], [])


def test_mixed_metrics_rejected():
    with pytest.raises(ValueError, match="metrics"):
        leaderboard([], [tr("a", 0, 0.1), tr("a", 1, 0.2, metric="loss", mode="min")])


# ------------------------------------------------------------------ confidence and significance

SEEDS = {"sdpa": [0.80, 0.82, 0.81], "flash": [0.80, 0.82, 0.81], "good": [0.90, 0.91, 0.92],
         "bad": [0.50, 0.52, 0.51], "noisy": [0.70, 0.95, 0.80]}


def seeded(values=SEEDS, mode="max"):
    return [tr(name, s, v, mode=mode) for name, vs in values.items() for s, v in enumerate(vs)]


def welch_p(a, b):
    return scipy_stats.ttest_ind(a, b, equal_var=False).pvalue


def test_quality_interval_is_scipys_t_interval():
    rows = by_name(leaderboard([], seeded()))
    for name, vs in SEEDS.items():
        lo, hi = scipy_stats.t.interval(0.95, len(vs) - 1, loc=np.mean(vs),
                                        scale=scipy_stats.sem(vs))
        r = rows[name]
        assert r["test_values"] == vs
        assert r["test_ci_low"] == pytest.approx(lo, rel=1e-9)
        assert r["test_ci_high"] == pytest.approx(hi, rel=1e-9)
    cols, cells = render_leaderboard(list(rows.values()), [])
    c = dict(zip(cols, cells[list(rows).index("noisy")], strict=True))
    lo, hi = scipy_stats.t.interval(0.95, 2, loc=np.mean(SEEDS["noisy"]),
                                    scale=scipy_stats.sem(SEEDS["noisy"]))
    assert c["test accuracy"] == f"{np.mean(SEEDS['noisy']):.4g} ± {(hi - lo) / 2:.2g}"


def test_differences_from_the_best_and_sdpa_are_marked_only_when_significant():
    rows = leaderboard([], seeded())
    assert [r["name"] for r in rows] == ["good", "noisy", "flash", "sdpa", "bad"]
    r = by_name(rows)
    assert r["good"]["is_best"] and r["good"]["vs_best"] is None
    assert r["sdpa"]["vs_baseline"] is None
    for name in ("noisy", "sdpa", "bad"):
        assert r[name]["vs_best"].p == pytest.approx(welch_p(SEEDS[name], SEEDS["good"]))
    for name in ("good", "noisy", "bad"):
        assert r[name]["vs_baseline"].p == pytest.approx(welch_p(SEEDS[name], SEEDS["sdpa"]))
    assert r["flash"]["vs_baseline"].p == 1.0  # the same accuracies: never significant
    cols, cells = render_leaderboard(rows, [])
    got = {row[0]: dict(zip(cols, row, strict=True)) for row in cells}
    p = {n: f"p = {welch_p(SEEDS[n], SEEDS['good']):.2g}" for n in ("noisy",)}
    assert got["good"]["vs best"] == "best" and got["sdpa"]["vs sdpa"] == "sdpa"
    assert got["noisy"]["vs best"] == f"= {p['noisy']}"  # 0.82 vs 0.91: within the spread
    assert got["sdpa"]["vs best"].startswith("▼ p ")
    assert got["bad"]["vs best"].startswith("▼ p ") and got["bad"]["vs sdpa"].startswith("▼")
    assert got["good"]["vs sdpa"].startswith("▲ p ")
    assert got["flash"]["vs sdpa"] == "= p = 1" and got["noisy"]["vs sdpa"].startswith("= ")


def test_better_and_worse_follow_the_mode():
    rows = by_name(leaderboard([], seeded(mode="min")))  # e.g. perplexity: lower is better
    assert rows["bad"]["is_best"]
    cols, cells = render_leaderboard(list(rows.values()), [])
    got = {row[0]: dict(zip(cols, row, strict=True)) for row in cells}
    assert got["good"]["vs sdpa"].startswith("▼") and got["bad"]["vs sdpa"].startswith("▲")


def test_one_seed_has_no_interval_and_no_test():
    vals = {"sdpa": [0.8, 0.82], "one": [0.99]}
    rows = by_name(leaderboard([], seeded(vals)))
    assert rows["one"]["test_ci_low"] is None and rows["one"]["is_best"]
    assert not rows["sdpa"]["vs_best"].tested and not rows["one"]["vs_baseline"].tested
    cols, cells = render_leaderboard(list(rows.values()), [])
    got = {row[0]: dict(zip(cols, row, strict=True)) for row in cells}
    assert got["one"]["test accuracy"] == "0.99 (1 seed: no CI)"
    assert got["sdpa"]["vs best"] == "untested (2 vs 1 seeds)"
    assert got["one"]["vs sdpa"] == "untested (1 vs 2 seeds)"


def test_no_trained_sdpa_means_no_sdpa_comparison():
    rows = leaderboard([], seeded({"good": SEEDS["good"], "bad": SEEDS["bad"]}))
    assert all(r["vs_baseline"] is None for r in rows)
    cols, cells = render_leaderboard(rows, [])
    assert [dict(zip(cols, c, strict=True))["vs sdpa"] for c in cells] == ["-", "-"]
