"""The report's words and tables on quality: which differences are significant, in words,
and every test metric as mean ± 95% CI (attnlab.report.sections). The p-values expected
here come from scipy directly, never from the code under test."""

from __future__ import annotations

import numpy as np
import pytest

from attnlab.report.document import Report
from attnlab.report.leaderboard import leaderboard
from attnlab.report.sections import all_test_metrics, quality_sentences

scipy_stats = pytest.importorskip("scipy.stats")


def tr(mech, seed, acc, f1=None, *, model="transformer"):
    test = {"accuracy": acc, "loss": 1.0 - acc, "n": 500,  # n: test examples, not a metric
            **({"macro_f1": f1} if f1 is not None else {})}
    return {"mechanism": mech, "model": model, "seed": seed, "metric": "accuracy",
            "mode": "max", "test_value": acc, "best_validation": acc, "parameters": 1,
            "throughput": None, "summary": {"convergence": {}, "test": test}}


def runs(values):
    return [tr(m, s, v) for m, vs in values.items() for s, v in enumerate(vs)]


def p(a, b):
    return f"p = {scipy_stats.ttest_ind(a, b, equal_var=False).pvalue:.2g}"


SDPA, PERF = [0.40, 0.42], [0.41, 0.45]


def test_a_difference_within_the_spread_is_said_not_to_be_significant():
    text = " ".join(quality_sentences(leaderboard([], runs({"sdpa": SDPA, "performer": PERF})),
                                      "listops"))
    assert f"performer and sdpa do not differ significantly on listops ({p(PERF, SDPA)}, " \
           f"2 seeds)." in text
    assert f"performer is not significantly better than sdpa ({p(SDPA, PERF)}, 2 seeds)" in text
    assert "Best test accuracy on listops: performer at 0.43 ± " in text
    assert "Significantly" not in text  # nothing here is a finding


def test_a_best_sdpa_is_compared_once():
    text = " ".join(quality_sentences(leaderboard([], runs({"sdpa": PERF, "linear": SDPA})),
                                      "listops"))
    assert f"linear and sdpa do not differ significantly on listops ({p(SDPA, PERF)}, " \
           f"2 seeds)." in text
    assert "sdpa is not significantly better" not in text


def test_significant_differences_are_said_with_their_p_values():
    vals = {"sdpa": [0.80, 0.82, 0.81], "good": [0.90, 0.91, 0.92], "bad": [0.50, 0.52, 0.51],
            "noisy": [0.70, 0.95, 0.80], "one": [0.6]}
    text = " ".join(quality_sentences(leaderboard([], runs(vals)), "listops"))
    g = vals["good"]
    assert f"good is not significantly better than noisy ({p(vals['noisy'], g)}, 3 seeds)" \
           in text
    assert "Significantly worse than good (p < 0.05): sdpa (p < 0.001, 3 seeds), bad " in text
    assert "Significantly better than sdpa on listops (p < 0.05): good (p < 0.001" in text
    assert "Significantly worse than sdpa on listops (p < 0.05): bad (p < 0.001" in text
    assert f"noisy and sdpa do not differ significantly on listops " \
           f"({p(vals['noisy'], vals['sdpa'])}, 3 seeds)" in text
    assert "Too few seeds for a test (fewer than 2 on a side): one;" in text


def test_no_training_no_sentences():
    assert quality_sentences(leaderboard([], []), "listops") == []


def test_every_test_metric_table_has_intervals_and_marks_significance():
    vals = {"sdpa": ([0.80, 0.82, 0.81], [0.70, 0.74, 0.72]),
            "good": ([0.90, 0.91, 0.92], [0.71, 0.75, 0.72]),
            "one": ([0.60], [0.50])}
    ts = [tr(m, s, a, f) for m, (acc, f1) in vals.items()
          for s, (a, f) in enumerate(zip(acc, f1, strict=True))]
    ts.append(tr("none", 0, 0.3, 0.2, model="lstm"))  # a baseline model: not in this table
    rep = Report("t")
    all_test_metrics(rep, leaderboard([], ts), ts)
    md = rep.to_markdown(".")
    lines = md.splitlines()
    assert lines[2] == "| mechanism | accuracy | loss | macro_f1 |"
    row = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ") for line in lines[4:7]}
    acc = vals["good"][0]
    lo, hi = scipy_stats.t.interval(0.95, 2, loc=np.mean(acc), scale=scipy_stats.sem(acc))
    assert row["good"][1] == f"{np.mean(acc):.4g} ± {(hi - lo) / 2:.2g} ▲"  # higher than sdpa
    assert row["good"][2].endswith(" ▼")  # its loss, 1 - accuracy, is lower
    assert "▲" not in row["good"][3] and "▼" not in row["good"][3]  # F1 within the spread
    assert not row["sdpa"][1].endswith(("▲", "▼"))
    assert row["one"][1:] == ["0.6 (1 seed: no CI)", "0.4 (1 seed: no CI)",
                              "0.5 (1 seed: no CI)"]
    assert "none" not in row and "Welch" in md and "95% confidence interval" in md
