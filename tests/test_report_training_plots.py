"""attnlab.report.training_plots: curves from metrics.jsonl, Pareto fronts, figures.

Pareto fronts are checked against answers worked out by hand (and against two properties:
the front's definition pair by pair, and min mode being max mode on -y); curve bands against
hand means/min/max; figures by their files and the names in their SVG text.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.report.training_plots import (
    _band,
    pareto_front,
    plot_loss_curves,
    plot_pareto,
    read_curves,
)


def _pts(rows):
    return [{"name": n, "throughput": x, "test_mean": y} for n, x, y in rows]


# ------------------------------------------------------------------ pareto_front
def test_pareto_front_max_mode_by_hand():
    pts = _pts([("A", 100, 0.90), ("B", 200, 0.80), ("C", 150, 0.70),  # C < B on both
                ("D", 50, 0.95), ("E", 100, 0.85),                      # E: as fast as A, worse
                ("F", 300, 0.50)])
    assert pareto_front(pts) == ["D", "A", "B", "F"]


def test_pareto_front_min_mode_by_hand():
    # perplexity: lower is better
    pts = _pts([("P", 10, 5.0), ("Q", 20, 6.0), ("R", 15, 7.0),  # R: slower and worse than Q
                ("S", 5, 4.0), ("T", 20, 6.5)])                  # T: as fast as Q, worse
    assert pareto_front(pts, mode="min") == ["S", "P", "Q"]
    # the same points read as accuracy: Q is fastest, T as fast and better, R best quality
    assert pareto_front(pts, mode="max") == ["R", "T"]


def test_pareto_front_ties():
    pts = _pts([("X", 100, 0.9), ("Y", 100, 0.9),   # identical: neither dominates the other
                ("Z", 90, 0.9),                     # same quality, slower: dominated
                ("W", 100, 0.8)])                   # same speed, worse: dominated
    assert pareto_front(pts) == ["X", "Y"]
    assert pareto_front(_pts([("only", 1, 0.0)])) == ["only"]


def test_pareto_front_custom_keys_and_seed_aggregates():
    pts = [{"name": "a", "tps": {"mean": 10.0, "std": 1.0}, "ppl": {"mean": 30.0}},
           {"name": "b", "tps": {"mean": 20.0, "std": 2.0}, "ppl": {"mean": 40.0}},
           {"name": "c", "tps": {"mean": 5.0, "std": 0.0}, "ppl": {"mean": 35.0}}]
    assert pareto_front(pts, x="tps", y="ppl", mode="min") == ["a", "b"]


def _dominates(q, p, mode):
    better_eq = q[2] >= p[2] if mode == "max" else q[2] <= p[2]
    strictly = q[2] > p[2] if mode == "max" else q[2] < p[2]
    return q[1] >= p[1] and better_eq and (q[1] > p[1] or strictly)


@settings(max_examples=60)
@given(rows=st.lists(st.tuples(st.integers(1, 6), st.integers(-4, 4)), min_size=1, max_size=9),
       mode=st.sampled_from(["max", "min"]))
def test_pareto_front_matches_definition(rows, mode):
    named = [(f"m{i}", x, y) for i, (x, y) in enumerate(rows)]
    front = pareto_front(_pts(named), mode=mode)
    expected = {p[0] for p in named if not any(_dominates(q, p, mode) for q in named)}
    assert set(front) == expected and len(front) == len(expected)
    assert [x for _, x, _ in sorted((p for p in named if p[0] in expected),
                                    key=lambda p: (p[1], p[0]))] == \
        [dict((n, x) for n, x, _ in named)[n] for n in front]
    # min mode is max mode on -y
    negated = _pts([(n, x, -y) for n, x, y in named])
    other = "max" if mode == "min" else "min"
    assert pareto_front(negated, mode=other) == front


def test_pareto_front_errors():
    with pytest.raises(ValueError, match="points"):
        pareto_front([])
    with pytest.raises(ValueError, match="mode"):
        pareto_front(_pts([("a", 1, 1)]), mode="best")
    with pytest.raises(KeyError, match="throughput"):
        pareto_front([{"name": "a", "test_mean": 1.0}])
    with pytest.raises(KeyError, match="name"):
        pareto_front([{"throughput": 1.0, "test_mean": 1.0}])
    with pytest.raises(ValueError, match="finite"):
        pareto_front(_pts([("a", 1, float("nan"))]))


# ------------------------------------------------------------------ read_curves
def test_read_curves_columns(tmp_path):
    rows = [{"step": 10, "time_s": 1.5, "train_loss": 2.0, "val_accuracy": 0.4},
            {"step": 20, "time_s": 3.0, "train_loss": 1.5, "val_accuracy": 0.5, "val_loss": 1.7},
            {"step": 30, "time_s": 4.5, "train_loss": 1.2, "val_accuracy": None}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    c = read_curves(tmp_path)
    assert list(c) == ["step", "time_s", "train_loss", "val_accuracy", "val_loss"]
    assert c["step"] == [10.0, 20.0, 30.0]
    assert c["train_loss"] == [2.0, 1.5, 1.2]
    assert c["val_accuracy"][:2] == [0.4, 0.5] and math.isnan(c["val_accuracy"][2])
    assert math.isnan(c["val_loss"][0]) and c["val_loss"][1] == 1.7
    assert json.dumps(read_curves(tmp_path / "metrics.jsonl")) == json.dumps(c)


def test_read_curves_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_curves(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no evaluation rows"):
        read_curves(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2: malformed JSON at column 1"):
        read_curves(tmp_path)


# ------------------------------------------------------------------ curves and figures
def test_band_uses_common_steps_mean_min_max():
    seeds = [{"step": [1, 2, 3], "train_loss": [3.0, 2.0, 1.0]},
             {"step": [1, 2], "train_loss": [5.0, 1.0]},           # stopped early
             {"step": [1, 2, 3], "train_loss": [1.0, float("nan"), 2.0]}]
    steps, mean, lo, hi = _band(seeds, "train_loss")
    assert steps == [1]                       # step 2 has a NaN in seed 3, step 3 no seed 2
    assert mean == [3.0] and lo == [1.0] and hi == [5.0]
    steps, mean, lo, hi = _band(seeds[:2], "train_loss")
    assert steps == [1, 2] and mean == [4.0, 1.5] and lo == [3.0, 1.0] and hi == [5.0, 2.0]


def _curve(offset, n=5):
    return {"step": [10.0 * i for i in range(1, n + 1)],
            "train_loss": [3.0 / i + offset for i in range(1, n + 1)],
            "val_loss": [2.0 / i for i in range(1, n + 1)],  # listed first, but not the metric
            "val_accuracy": [0.1 * i - offset for i in range(1, n + 1)]}


def test_plot_loss_curves_writes_files_with_names(tmp_path):
    pytest.importorskip("matplotlib")
    curves = {"softmax_ref": [_curve(0.0), _curve(0.1, 4)], "performer_x": [_curve(0.3)]}
    paths = plot_loss_curves(curves, tmp_path / "sub" / "loss.png")
    assert [p.name for p in paths] == ["loss.png", "loss.svg", "loss-panels.png",
                                       "loss-panels.svg"]
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
    for svg in (paths[1], paths[3]):
        text = svg.read_text()
        assert "softmax_ref" in text and "performer_x" in text
    panels = paths[3].read_text()
    assert "val_accuracy" in panels and "val_loss" not in panels  # the task metric by default


def test_plot_pareto_writes_files_with_names(tmp_path):
    pytest.importorskip("matplotlib")
    pts = _pts([("flash_fast", 300, 0.7), ("exact_slow", 100, 0.9), ("bad_one", 50, 0.5)])
    paths = plot_pareto(pts, tmp_path / "pareto", mode="max")
    assert [p.name for p in paths] == ["pareto.png", "pareto.svg"]
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    text = paths[1].read_text()
    for n in ("flash_fast", "exact_slow", "bad_one"):
        assert n in text


def test_plot_errors(tmp_path):
    with pytest.raises(ValueError, match="curves"):
        plot_loss_curves({}, tmp_path / "x")
    with pytest.raises(ValueError, match="no seeds"):
        plot_loss_curves({"a": []}, tmp_path / "x")
    with pytest.raises(KeyError, match="train_loss"):
        plot_loss_curves({"a": [{"step": [1.0]}]}, tmp_path / "x")
    with pytest.raises(ValueError, match="points"):
        plot_pareto([], tmp_path / "x")
    assert not list(tmp_path.iterdir())
