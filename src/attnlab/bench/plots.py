"""Plots of one benchmark run: time, memory, speedup, error-vs-time front, roof fraction.

matplotlib is optional (the ``viz`` extra) and imported only when a plot is drawn. Figures
are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through ``pyplot``:
no display is needed, and no global backend or open-figure list is touched, so plotting
from a notebook or a server leaves its matplotlib state alone.

One set of figures per configuration (``pass_, causal, dtype, batch, heads, head_dim,
device``), one line per label. Points that were not measured (OOM, timeout, FAILED, ...)
are drawn as an ``x`` at the top edge of the axes at their length and listed in the
legend entry of their label, so a mechanism that ran out of memory does not just vanish.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from attnlab.bench.analysis import (
    CONFIG_KEYS,
    describe_crossover,
    format_bytes,
    format_length,
    format_time,
    pareto_front,
    status_word,
    summarise,
)
from attnlab.util.optional import matplotlib_agg

__all__ = ["plot_run"]

_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf"]
# 7 markers against 10 colours: 70 distinct (colour, marker) pairs before one repeats.
_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
_LINESTYLES = ["-", "--", ":"]
_MARK_STEP = 0.035  # vertical spacing (axes fraction) of stacked "not measured" marks
_LEGEND_INSIDE_MAX = 8  # longer legends go to the right of the axes
_RC = {"svg.fonttype": "none",  # keep text as <text> in SVG: searchable, selectable
       "font.size": 10, "axes.grid": True, "grid.alpha": 0.3, "axes.titlesize": 9}


def _mpl():
    matplotlib, Figure, FigureCanvasAgg = matplotlib_agg("attnlab.bench.plots")
    from matplotlib.ticker import FuncFormatter, NullFormatter
    return matplotlib, Figure, FigureCanvasAgg, FuncFormatter, NullFormatter


def plot_run(rows: Iterable[dict], meta: dict, out_dir: str | Path,
             formats: Sequence[str] = ("png", "svg"), baseline: str = "sdpa") -> list[Path]:
    """Write the figures of a run into ``out_dir`` (created if needed); return every path.

    Per configuration with at least one ok point: ``time_vs_n``, ``memory_vs_n`` (log-log,
    fitted exponent in the legend), ``speedup_vs_n`` (when the baseline is there),
    ``pareto_error_time`` (at the largest N where two labels have a time and an error) and
    ``roof_vs_n`` (when roof fractions were measured). File names carry the configuration,
    e.g. ``time_vs_n-fwd-noncausal-float32-B1-H8-D64-cpu.png``.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("plot_run: rows is empty; expected the measured points of a run "
                         "(one dict per point), got none")
    if isinstance(formats, str) or not formats:
        raise ValueError(f"plot_run: formats must be a non-empty sequence such as ('png', "
                         f"'svg'), got {formats!r}")
    mpl = _mpl()
    summary = summarise(rows, baseline=baseline)
    styles = _styles(summary)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple, list[dict]] = {}
    for e in summary:
        groups.setdefault(tuple(e[k] for k in CONFIG_KEYS), []).append(e)
    paths: list[Path] = []
    with mpl[0].rc_context(_RC):
        for cfg, es in groups.items():
            if not any(e["time"] for e in es):
                continue  # nothing ok: nothing to draw
            ctx = _Ctx(mpl, dict(zip(CONFIG_KEYS, cfg, strict=True)), meta, styles, out_dir,
                       formats)
            paths += _scaling(ctx, es, "time", "time per call", "time_exponent")
            paths += _scaling(ctx, es, "memory", "peak memory above the inputs",
                              "memory_exponent")
            paths += _speedup(ctx, es)
            paths += _pareto(ctx, es)
            paths += _roof(ctx, es, meta)
    return paths


class _Ctx:
    """What every figure of one configuration shares: titles, styles, where to save."""

    def __init__(self, mpl, cfg, meta, styles, out_dir, formats):
        self.mpl, self.cfg, self.styles, self.out_dir, self.formats = (mpl, cfg, styles,
                                                                      out_dir, formats)
        c = cfg
        self.title = (f"{c['pass_']}, {'causal' if c['causal'] else 'non-causal'}, {c['dtype']}, "
                      f"B={c['batch']} H={c['heads']} D={c['head_dim']}, {c['device']}")
        self.stem = (f"{c['pass_'].replace('+', '_')}-{'causal' if c['causal'] else 'noncausal'}"
                     f"-{c['dtype']}-B{c['batch']}-H{c['heads']}-D{c['head_dim']}-{c['device']}")
        m = (meta or {}).get("machine") or {}
        gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
        commit = (meta or {}).get("commit") or "?"
        torch_v = ((meta or {}).get("versions") or {}).get("torch", "?")
        self.subtitle = (f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores){gpu}  |  "
                         f"torch {torch_v}  |  commit {commit[:10]}  |  "
                         f"run {(meta or {}).get('run_id', '?')}")

    def figure(self, heading: str):
        _, Figure, FigureCanvasAgg, *_ = self.mpl
        fig = Figure(figsize=(10, 6), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        fig.suptitle(f"{heading}: {self.title}", fontsize=12)
        ax.set_title(self.subtitle, color="0.35")
        self._log_axes = []
        return fig, ax

    def log_axis(self, ax, which: str, fmt, base: int = 10) -> None:
        """A log axis whose tick labels read ``fmt(value)`` (``10 ms``, ``1 MiB``, ``2x``)."""
        axis = ax.xaxis if which == "x" else ax.yaxis
        (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=base)
        self._log_axes.append((axis, fmt, base))

    def _label_ticks(self) -> None:
        # Done at save time, once the limits are final: an axis spanning less than about a
        # decade has at most one major tick, so its 2x and 5x minor ticks get labels too.
        FuncFormatter, NullFormatter = self.mpl[3], self.mpl[4]
        for axis, fmt, base in self._log_axes:
            axis.set_major_formatter(FuncFormatter(lambda v, _, f=fmt: _tidy(f(v))))
            lo, hi = sorted(axis.get_view_interval())
            if base == 10 and lo > 0 and hi / lo < 30:
                keep = range(10) if hi / lo < 3 else (2, 5)  # a narrow axis labels them all
                axis.set_minor_formatter(FuncFormatter(
                    lambda v, _, f=fmt, k=keep: _tidy(f(v)) if _mantissa(v) in k else ""))
            else:
                axis.set_minor_formatter(NullFormatter())

    def save(self, fig, ax, kind: str, n_entries: int) -> list[Path]:
        self._label_ticks()
        if n_entries > _LEGEND_INSIDE_MAX:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                      ncols=1 if n_entries <= 30 else 2)
        elif n_entries:
            ax.legend(fontsize=8, framealpha=0.85)
        paths = []
        for fmt in self.formats:
            p = self.out_dir / f"{kind}-{self.stem}.{fmt}"
            fig.savefig(p, dpi=120, bbox_inches="tight",
                        metadata={"Date": None} if fmt == "svg" else None)
            paths.append(p)
        return paths

    def style(self, label: str) -> dict:
        return self.styles[label]

    def n_axis(self, ax, ns: Iterable[int]) -> None:
        """Log-2 length axis with a tick at each measured N (when they are few enough)."""
        *_, FuncFormatter, NullFormatter = self.mpl
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N")
        ns = sorted(set(ns))
        if 0 < len(ns) <= 14:
            ax.set_xticks(ns)
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_length(v)))


def _styles(summary: list[dict]) -> dict[str, dict]:
    """One (colour, marker, line style) per label, the same in every figure of the run;
    the baseline is drawn black and thicker."""
    labels = sorted({e["label"] for e in summary})
    bases = {e["label"] for e in summary if e["is_baseline"]}
    out, i = {}, 0
    for lab in labels:
        if lab in bases:
            out[lab] = {"color": "black", "marker": "o", "linestyle": "-", "linewidth": 2.4}
            continue
        out[lab] = {"color": _COLOURS[i % 10], "marker": _MARKERS[i % 7],
                    "linestyle": _LINESTYLES[(i // 10) % 3], "linewidth": 1.4}
        i += 1
    return out


def _status_note(e: dict) -> str:
    by_word: dict[str, list[str]] = {}
    for n, s in sorted(e["status"].items()):
        by_word.setdefault(status_word(s), []).append(format_length(n))
    return "; ".join(f"{w} {','.join(ns)}" for w, ns in by_word.items())


def _make_room(ax, frac: float) -> None:
    """Raise the top of a log y axis so the data stay below ``1 - frac`` of the height,
    leaving a band where the failure marks cannot hide a line."""
    lo, hi = ax.get_ylim()
    frac = min(frac, 0.5)
    ax.set_ylim(lo, hi * (hi / lo) ** (frac / (1 - frac)))


def _tidy(text: str) -> str:
    """``1.00 ms`` -> ``1 ms``, ``10.0 us`` -> ``10 us``: tick labels sit on round values."""
    return text.replace(".00 ", " ").replace(".0 ", " ")


def _mantissa(v: float) -> int:
    return round(v / 10 ** math.floor(math.log10(v) + 1e-9)) if v > 0 else 0


def _scaling(ctx: _Ctx, es: list[dict], field: str, ylabel: str, exp_key: str) -> list[Path]:
    """Log-log ``field`` vs N, one line per label, failures as x at the top edge."""
    if not any(e[field] for e in es):
        return []
    fig, ax = ctx.figure("time vs N" if field == "time" else "peak memory vs N")
    blended = ax.get_xaxis_transform()  # x in data, y in axes fraction
    stack: dict[int, int] = {}  # how many failure marks already sit at each N
    all_ns = []
    for e in es:
        st = ctx.style(e["label"])
        pts = sorted((n, v) for n, v in e[field].items() if v and v > 0)
        a = e[exp_key]
        text = e["label"] + (f"  N^{a:.2f}" if a is not None else "")
        if e["status"]:
            text += f"  [{_status_note(e)}]"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=text, markersize=5, **st)
        for n, s in sorted(e["status"].items()):
            k = stack[n] = stack.get(n, -1) + 1
            y = 0.98 - _MARK_STEP * k
            ax.plot([n], [y], transform=blended, marker="x", color=st["color"], markersize=8,
                    markeredgewidth=2, linestyle="none", clip_on=False)
            ax.annotate(status_word(s), (n, y), xycoords=blended, xytext=(6, 0),
                        textcoords="offset points", fontsize=6, color=st["color"], va="center")
        all_ns += [p[0] for p in pts] + list(e["status"])
    if field == "time":
        ctx.log_axis(ax, "y", format_time)
    else:  # powers of two land on round KiB / MiB / GiB
        ctx.log_axis(ax, "y", format_bytes, base=2)
    if stack:
        _make_room(ax, 0.04 + _MARK_STEP * (max(stack.values()) + 1))
    ctx.n_axis(ax, all_ns)
    ax.set_ylabel(ylabel + (" (median)" if field == "time" else ""))
    if any(e["status"] for e in es):
        ax.text(0.99, 0.01, "x at the top: not measured (status in the legend)", fontsize=7,
                color="0.4", ha="right", va="bottom", transform=ax.transAxes)
    kind = "time_vs_n" if field == "time" else "memory_vs_n"
    return ctx.save(fig, ax, kind, len(es))


def _speedup(ctx: _Ctx, es: list[dict]) -> list[Path]:
    others = [e for e in es if e["speedup"] and not e["is_baseline"]]
    if not others:
        return []
    base = es[0]["baseline"]
    fig, ax = ctx.figure(f"speedup over {base} vs N")
    ax.axhline(1.0, color="black", linewidth=1.2, linestyle="--", label=f"{base} (= 1)")
    for e in others:
        pts = sorted(e["speedup"].items())
        c = describe_crossover(e)
        note = {"~": f"  crosses at {c}", "<": f"  faster from {c[2:]}", ">": "  never faster"}
        ax.plot([p[0] for p in pts], [p[1] for p in pts],
                label=e["label"] + note.get(c[:1], ""), markersize=5,
                **ctx.style(e["label"]))
    # Ratios: log y puts 0.1x and 10x the same distance from 1x.
    ctx.log_axis(ax, "y", lambda v: f"{v:g}x")
    ctx.n_axis(ax, [n for e in others for n in e["speedup"]])
    ax.set_ylabel(f"speedup = t({base}) / t  (> 1: faster than {base})")
    return ctx.save(fig, ax, "speedup_vs_n", len(others) + 1)


def _pareto(ctx: _Ctx, es: list[dict]) -> list[Path]:
    both = [(n, e) for e in es for n in e["time"] if n in e["error"]]
    counts: dict[int, int] = {}
    for n, _ in both:
        counts[n] = counts.get(n, 0) + 1
    ns = [n for n, c in counts.items() if c >= 2]
    if not ns:
        return []
    n = max(ns)
    pts = [(e["time"][n], e["error"][n], e) for m, e in both if m == n]
    positive = [err for _, err, _ in pts if err > 0]
    # Exact mechanisms can have error 0: draw them on a floor a decade below the rest.
    floor = min(positive) / 10 if positive else 1e-16
    xy = [(t, err if err > 0 else floor) for t, err, _ in pts]
    front = pareto_front(xy)
    fig, ax = ctx.figure(f"error vs time at N={format_length(n)} (Pareto front)")
    for i, (_, err, e) in enumerate(pts):
        st = ctx.style(e["label"])
        on = i in front
        ax.scatter([xy[i][0]], [xy[i][1]], color=st["color"], marker=st["marker"],
                   s=90 if on else 40, edgecolors="black" if on else "none", linewidths=1.2,
                   zorder=3, label=e["label"] + (" (error 0)" if err <= 0 else "")
                   + ("  [front]" if on else ""))
        if on:
            ax.annotate(e["label"], xy[i], xytext=(6, 6), textcoords="offset points",
                        fontsize=8, fontweight="bold")
    # Labels with no point here are listed, not dropped: a fast mechanism that ran out of
    # memory at this N must not look as if it had never been tried.
    shown = {e["label"] for _, _, e in pts}
    missing = [e for e in es if e["label"] not in shown]
    for e in missing:
        why = status_word(e["status"][n]) if n in e["status"] else (
            "no error measured" if n in e["time"] else "not run")
        ax.plot([], [], linestyle="none", marker="x", color=ctx.style(e["label"])["color"],
                label=f"{e['label']}  [{why} at {format_length(n)}]")
    fx, fy = [xy[i][0] for i in front], [xy[i][1] for i in front]
    ax.plot(fx, fy, drawstyle="steps-post", color="black", alpha=0.5, linewidth=1.5, zorder=2)
    ctx.log_axis(ax, "x", format_time)
    ax.set_yscale("log")
    ax.margins(0.08)
    ax.set_xlabel("time per call (median)")
    ax.set_ylabel("relative error vs exact attention")
    ax.text(0.99, 0.01, "front: no other point is both faster and more accurate",
            fontsize=7, color="0.4", ha="right", va="bottom", transform=ax.transAxes)
    return ctx.save(fig, ax, "pareto_error_time", len(pts) + len(missing))


def _roof(ctx: _Ctx, es: list[dict], meta: dict) -> list[Path]:
    # e["roof"] holds fractions <= 1 only (summarise): one above 1 is a measurement error.
    have = [e for e in es if e["roof"]]
    if not have:
        return []
    fig, ax = ctx.figure("fraction of the matmul roof vs N")
    for e in have:
        pts = sorted(e["roof"].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts],
                label=f"{e['label']}  best {e['best_roof']:.1%}", markersize=5,
                **ctx.style(e["label"]))
    ctx.log_axis(ax, "y", lambda v: f"{v:.3g}")
    ctx.n_axis(ax, [n for e in have for n in e["roof"]])
    roof = ((meta or {}).get("machine") or {}).get("roof_gflops")
    roof_txt = f" ({roof:.0f} GFLOP/s)" if isinstance(roof, (int, float)) and math.isfinite(
        roof) else ""
    ax.set_ylabel(f"achieved / best measured fp32 matmul roof{roof_txt}")
    return ctx.save(fig, ax, "roof_vs_n", len(have))
