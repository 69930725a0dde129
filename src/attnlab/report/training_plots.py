"""Training figures for the report: loss curves over seeds and the quality/speed Pareto front.

A training run directory (see :mod:`attnlab.train.loop`) holds ``metrics.jsonl``, one JSON
row per evaluation (``step``, ``time_s``, ``train_loss``, ``val_<metric>``, ...).
:func:`read_curves` turns it into columns; :func:`plot_loss_curves` draws, per mechanism,
the mean over seeds as a line and the min-max band around it.

A mechanism ``p`` is Pareto-optimal when no other ``q`` is at least as fast and at least as
good, and strictly better in one of the two:

.. math::

    q \\succ p \\iff x_q \\ge x_p \\;\\wedge\\; y_q \\succeq y_p \\;\\wedge\\;
    (x_q > x_p \\vee y_q \\succ y_p)

with ``x`` the throughput (higher is better) and ``y`` the quality, where ``\\succeq`` is
``>=`` for ``mode="max"`` (accuracy) and ``<=`` for ``mode="min"`` (perplexity). Identical
points do not dominate each other, so both stay on the front.

matplotlib is optional (the ``viz`` extra) and imported only when a figure is drawn; figures
use ``matplotlib.figure.Figure`` on an Agg canvas, never ``pyplot``, and SVG text stays text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from attnlab.bench.analysis import pareto_front as lowest_front
from attnlab.files import FileFormatError
from attnlab.report.figures import mpl, plain, save

__all__ = ["pareto_front", "plot_loss_curves", "plot_pareto", "read_curves"]

_RC = {"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 9}
MODES = ("max", "min")


# ------------------------------------------------------------------------------ data
def _float(v: Any) -> float:
    # A missing or non-numeric entry becomes NaN so every column keeps one value per row.
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def read_curves(run_dir: str | Path) -> dict[str, list[float]]:
    """Columns of ``run_dir/metrics.jsonl``: key -> one value per evaluation row.

    Keys appear in their first-seen order; a row without a key (or with a non-numeric
    value) contributes NaN there. ``run_dir`` may also name the ``metrics.jsonl`` itself."""
    p = Path(run_dir)
    path = p if p.suffix == ".jsonl" else p / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"run_dir: expected a run directory with metrics.jsonl; "
                                f"{path} does not exist")
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"metrics file {path}: not UTF-8 text (byte {e.start})") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:  # e's "line 1" is of the line alone: say the file's
            raise FileFormatError(f"metrics file {path} line {i}: malformed JSON at column "
                                  f"{e.colno}: {e.msg} (one JSON object per line)") from None
        if not isinstance(row, dict):
            raise FileFormatError(f"metrics file {path} line {i}: expected a JSON object; "
                                  f"got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise FileFormatError(f"metrics file {path}: no evaluation rows (empty file)")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [_float(row.get(k)) for row in rows] for k in keys}


def _value(point: Mapping[str, Any], key: str) -> float:
    """``point[key]`` as a float; a seed aggregate ``{"mean": ...}`` gives its mean."""
    if key not in point:
        raise KeyError(f"points: expected a {key!r} entry in every point; "
                       f"{point.get('name', point)!r} has {sorted(point)}")
    v = point[key]
    if isinstance(v, Mapping):
        v = v.get("mean")
    f = _float(v)
    if not math.isfinite(f):
        raise ValueError(f"points: {key!r} of {point.get('name')!r} must be a finite number, "
                         f"got {point[key]!r}")
    return f


def _checked(points: Sequence[Mapping[str, Any]], x: str, y: str, mode: str):
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not points:
        raise ValueError("points: expected at least one point, got none")
    out = []
    for p in points:
        if "name" not in p:
            raise KeyError(f"points: expected a 'name' entry in every point; got {sorted(p)}")
        out.append((str(p["name"]), _value(p, x), _value(p, y)))
    return out


def pareto_front(points: Sequence[Mapping[str, Any]], x: str = "throughput",
                 y: str = "test_mean", mode: str = "max") -> list[str]:
    """Names of the Pareto-optimal points (higher ``x`` better; ``y`` by ``mode``),
    ordered by increasing ``x`` (ties by name)."""
    pts = _checked(points, x, y, mode)
    sign = 1.0 if mode == "max" else -1.0
    # the benchmark's front minimises both coordinates: negate what is better higher
    front = lowest_front([(-px, -sign * py) for _, px, py in pts])
    return [pts[i][0] for i in sorted(front, key=lambda i: (pts[i][1], pts[i][0]))]


def _band(runs: Sequence[Mapping[str, Sequence[float]]], key: str):
    """Steps present (finite) in every seed, and the mean, min, max of ``key`` there.

    Seeds may stop at different steps (early stopping): only common steps are averaged,
    so the mean never mixes a different number of seeds along the line."""
    per_seed = []
    for r in runs:
        if key not in r or "step" not in r:
            return [], [], [], []
        per_seed.append({s: v for s, v in zip(r["step"], r[key], strict=True)
                         if math.isfinite(s) and math.isfinite(v)})
    steps = sorted(set.intersection(*(set(d) for d in per_seed)))
    vals = [[d[s] for d in per_seed] for s in steps]
    return (steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals],
            [max(v) for v in vals])


def _val_key(runs: Sequence[Mapping[str, Any]]) -> str | None:
    # The task's metric (accuracy, perplexity, ...) rather than val_loss where there is one.
    keys = [k for k in runs[0] if k.startswith("val_")]
    rest = [k for k in keys if k != "val_loss"]
    return (rest or keys or [None])[0]


# ------------------------------------------------------------------------------ figures
def _draw(ax, runs, key: str, color, label: str | None, ls: str = "-") -> bool:
    steps, mean, lo, hi = _band(runs, key)
    if not steps:
        return False
    ax.plot(steps, mean, color=color, label=label, lw=1.4, ls=ls)
    if len(runs) > 1:
        ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
    return True


def plot_loss_curves(curves: Mapping[str, Sequence[Mapping[str, Sequence[float]]]], path, *,
                     key: str = "train_loss", val_key: str | None = None) -> list[Path]:
    """Loss curves of several mechanisms; returns the four files written.

    ``curves`` maps a mechanism name to its per-seed curves (each as :func:`read_curves`
    gives). ``path`` (``fig``) gets ``fig.png``/``fig.svg``: every mechanism's ``key`` on one
    chart, mean over seeds as a line and the min-max band; and ``fig-panels.png``/``.svg``:
    one panel per mechanism with ``key`` and the validation metric (``val_key``, by default
    the first ``val_*`` column other than ``val_loss``) on a twin axis."""
    if not curves:
        raise ValueError("curves: expected at least one mechanism, got none")
    for name, runs in curves.items():
        if not runs:
            raise ValueError(f"curves: mechanism {name!r} has no seeds")
        for r in runs:
            if "step" not in r or key not in r:
                raise KeyError(f"curves: every curve needs 'step' and {key!r} columns; "
                               f"one of {name!r} has {sorted(r)}")
    matplotlib, Figure, Canvas = mpl("attnlab.report.training_plots")
    names = list(curves)
    outs: list[Path] = []
    with matplotlib.rc_context(_RC):
        colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        color = {n: colors[i % len(colors)] for i, n in enumerate(names)}

        many = len(names) > 8  # a legend that big goes beside the axes, not over the lines
        fig = Figure(figsize=(8.4 if many else 6.4, 4.4), layout="constrained")
        Canvas(fig)
        ax = fig.add_subplot()
        styles = ["-", "--", ":", "-."]  # colours repeat after 10: the dash tells them apart
        for i, n in enumerate(names):
            _draw(ax, curves[n], key, color[n], plain(n), styles[(i // len(colors)) % 4])
        ax.set_xlabel("step")
        ax.set_ylabel(plain(key))
        ax.set_title(f"{plain(key)}: mean over seeds, min-max band")
        if many:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                      ncols=1 if len(names) <= 18 else 2)
        else:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        outs += save(fig, path)

        cols = min(len(names), 3)
        rows = math.ceil(len(names) / cols)
        fig = Figure(figsize=(3.2 * cols, 2.6 * rows), layout="constrained")
        Canvas(fig)
        for i, n in enumerate(names):
            ax = fig.add_subplot(rows, cols, i + 1)
            _draw(ax, curves[n], key, "C0", plain(key))
            ax.set_title(plain(n))
            ax.set_xlabel("step")
            ax.set_ylabel(plain(key), color="C0")
            vk = val_key or _val_key(curves[n])
            if vk is not None and vk != key:
                ax2 = ax.twinx()
                if _draw(ax2, curves[n], vk, "C1", plain(vk)):
                    ax2.set_ylabel(plain(vk), color="C1")
            ax.grid(alpha=0.3)
        outs += save(fig, path, "-panels")
    return outs


def plot_pareto(points: Sequence[Mapping[str, Any]], path, *, x: str = "throughput",
                y: str = "test_mean", mode: str = "max") -> list[Path]:
    """Quality ``y`` against throughput ``x`` (log scale), one labelled dot per mechanism;
    the Pareto-optimal ones (:func:`pareto_front`) are joined by a line. Returns the
    PNG and SVG paths."""
    pts = _checked(points, x, y, mode)
    front = set(pareto_front(points, x, y, mode))
    matplotlib, Figure, Canvas = mpl("attnlab.report.training_plots")
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(6.4, 4.4), layout="constrained")
        Canvas(fig)
        ax = fig.add_subplot()
        on = sorted((p for p in pts if p[0] in front), key=lambda p: (p[1], p[0]))
        off = [p for p in pts if p[0] not in front]
        ax.scatter([p[1] for p in off], [p[2] for p in off], color="0.6", zorder=2,
                   label="dominated")
        ax.scatter([p[1] for p in on], [p[2] for p in on], color="C3", zorder=3,
                   label="Pareto-optimal")
        ax.plot([p[1] for p in on], [p[2] for p in on], color="C3", lw=1.2, zorder=2)
        for n, px, py in pts:
            ax.annotate(plain(n), (px, py), xytext=(4, 4), textcoords="offset points",
                        fontsize=8, color="C3" if n in front else "0.35",
                        fontweight="bold" if n in front else "normal")
        if all(p[1] > 0 for p in pts):
            ax.set_xscale("log")
        better = "higher" if mode == "max" else "lower"
        ax.set_xlabel(f"{plain(x)} (higher is better)")
        ax.set_ylabel(f"{plain(y)} ({better} is better)")
        ax.set_title("quality vs throughput: Pareto front")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        return save(fig, path)
