"""Pure analysis of benchmark rows: scaling exponents, crossovers, summaries, comparisons.

Works on plain lists of dicts (one per measured point, the schema of ``attnlab bench``'s
store: ``label``, ``N``, ``status``, ``time_s``, ``peak_mem_bytes``, ...) so it depends on
neither the store nor torch. Only points with ``status == "ok"`` ever contribute a number;
every other status (``FAILED``, ``oom``, ``timeout``, ``error``, ``unsupported``,
``skipped``) is carried as a word, so a failed point can never be mistaken for a measurement.

Scaling is read as a power law, ``t(N) ~ c N^a``: ``a`` is the least-squares slope of
``log t`` on ``log N``. Small lengths are dominated by fixed overheads (kernel launches,
Python), so :func:`summarise` fits on ``N >= FIT_MIN_N`` when it has two such points.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from rich.table import Table

from attnlab.bench.formatting import (
    describe_hparams,
    format_bytes,
    format_length,
    format_time,
    status_word,
)

__all__ = [
    "CONFIG_KEYS",
    "FIT_MIN_N",
    "compare_runs",
    "crossover",
    "describe_crossover",
    "describe_hparams",
    "fit_exponent",
    "format_bytes",
    "format_length",
    "format_time",
    "pareto_front",
    "render_compare",
    "render_table",
    "row_hparams",
    "status_word",
    "summarise",
]

#: Exponents are fitted on N >= FIT_MIN_N when at least two such points were measured.
FIT_MIN_N = 4096
#: What a configuration is, apart from the mechanism: one plot (and one baseline) per value.
CONFIG_KEYS = ("pass_", "causal", "dtype", "batch", "heads", "head_dim", "device")
_REQUIRED = ("mechanism", "label", "N", *CONFIG_KEYS, "status", "time_s", "peak_mem_bytes")
_STYLES = {"FAILED": "bold red", "error": "red", "OOM": "yellow", "timeout": "yellow",
           "unsupported": "dim", "skipped": "dim"}


def fit_exponent(ns: Sequence[float], ys: Sequence[float | None],
                 n_min: float | None = None, n_max: float | None = None) -> float | None:
    """Least-squares slope ``a`` of ``log y = a log N + b`` over points with
    ``n_min <= N <= n_max``; ``None`` with fewer than two distinct lengths.

    Points whose ``y`` is ``None``, non-finite or ``<= 0`` are skipped (no logarithm).
    """
    if len(ns) != len(ys):
        raise ValueError(f"fit_exponent: ns and ys must have the same length, "
                         f"got {len(ns)} and {len(ys)}")
    pts = [(float(n), float(y)) for n, y in zip(ns, ys, strict=True)
           if y is not None and math.isfinite(y) and y > 0 and n > 0
           and (n_min is None or n >= n_min) and (n_max is None or n <= n_max)]
    if len({n for n, _ in pts}) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def crossover(ns: Sequence[float], t_mech: Sequence[float | None],
              t_base: Sequence[float | None]) -> float | None:
    """The smallest N at which the mechanism is at least as fast as the baseline.

    Only lengths where both times are present (not ``None``, > 0) count. With
    ``d(N) = log(t_mech / t_base)``: if ``d <= 0`` at the first common length, that length is
    returned; otherwise the first pair of consecutive common lengths with ``d > 0`` then
    ``d <= 0`` brackets the crossing, and ``d`` is interpolated linearly in ``log N``
    between them (exact when both times are power laws over that interval). ``None`` when
    the mechanism is never at least as fast within the data.

    A mechanism that is faster, then slower, then faster again (noise, or a kernel switch
    at some length) gets the *first* crossing: the result is where it first wins, not
    where it wins for good. The per-length speedups in :func:`summarise` show the rest.
    """
    if not len(ns) == len(t_mech) == len(t_base):
        raise ValueError(f"crossover: ns, t_mech and t_base must have the same length, got "
                         f"{len(ns)}, {len(t_mech)} and {len(t_base)}")
    pts = sorted((float(n), math.log(m / b)) for n, m, b in zip(ns, t_mech, t_base, strict=True)
                 if m is not None and b is not None and m > 0 and b > 0)
    if not pts:
        return None
    if pts[0][1] <= 0:
        return pts[0][0]
    for (n0, d0), (n1, d1) in zip(pts, pts[1:], strict=False):
        if d0 > 0 >= d1:
            frac = d0 / (d0 - d1)  # where the straight line through (log n, d) meets 0
            return float(math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0))))
    return None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better),
    sorted by the first coordinate. Exact duplicates are all kept."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 <= x and y2 <= y and (x2 < x or y2 < y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i])


def _check(rows: Iterable[dict], where: str) -> list[dict]:
    rows = list(rows)
    for i, r in enumerate(rows):
        missing = [k for k in _REQUIRED if k not in r]
        if missing:
            raise ValueError(f"{where}: row {i} lacks key(s) {missing}; expected the bench row "
                             f"schema, got keys {sorted(r)}")
    return rows


def _config(r: dict) -> tuple:
    return tuple(r[k] for k in CONFIG_KEYS)


def _ok(r: dict) -> bool:
    return r["status"] == "ok"


def _fit(points: dict[int, float]) -> tuple[float | None, tuple[int, int] | None]:
    """The exponent and the (min N, max N) range it was fitted on (the N >= FIT_MIN_N rule)."""
    ns = sorted(points)
    big = [n for n in ns if n >= FIT_MIN_N]
    use = big if len(big) >= 2 else ns
    a = fit_exponent(use, [points[n] for n in use])
    return a, ((use[0], use[-1]) if a is not None else None)


def summarise(rows: Iterable[dict], baseline: str = "sdpa") -> list[dict]:
    """One entry per configuration group: label plus ``CONFIG_KEYS``.

    Each entry holds the group keys, ``mechanism``, ``hparams`` and:
    ``time``, ``time_iqr``, ``memory``, ``error``, ``roof`` (dicts N -> value, ok points only;
    a roof fraction above 1 is a measurement error and left out), ``effective_hparams``
    (N -> the built module's hyperparameters, where the store has them),
    ``status`` (N -> status of every non-ok point), ``message`` (N -> reason),
    ``time_exponent`` / ``memory_exponent`` with ``time_fit_range`` / ``memory_fit_range``
    (the (min N, max N) used), ``baseline`` (the baseline's label in the same configuration,
    or None), ``is_baseline``, ``crossover`` with ``crossover_note`` (``"ok"``, ``"never"``,
    ``"baseline"``, ``"no baseline"``, ``"no common lengths"``), ``speedup`` (N ->
    t_baseline / t), ``max_error`` and ``best_roof`` (over ok points).

    The baseline of a configuration is its row with ``mechanism == baseline``; if several
    labels share that mechanism, the one whose label is the bare name wins, else the first.
    Entries are sorted by configuration, then by time at the largest length every label
    of the configuration measured ok (fastest first); labels without a time there follow,
    the ones that got further first. Duplicate points raise ``ValueError``.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in _check(rows, "summarise"):
        groups.setdefault((r["label"], *_config(r)), []).append(r)
    out = []
    for key, rs in groups.items():
        seen: dict[int, dict] = {}
        for r in rs:
            if r["N"] in seen:
                raise ValueError(f"summarise: two rows for the same point {key} N={r['N']}")
            seen[r["N"]] = r
        ok = [r for r in rs if _ok(r)]
        e = {"label": key[0], **dict(zip(CONFIG_KEYS, key[1:], strict=True)),
             "mechanism": rs[0]["mechanism"], "hparams": rs[0].get("hparams") or {}}
        e["time"] = {r["N"]: r["time_s"] for r in ok if r["time_s"] is not None}
        e["time_iqr"] = {r["N"]: r.get("time_iqr_s") for r in ok if r["time_s"] is not None}
        e["memory"] = {r["N"]: r["peak_mem_bytes"] for r in ok if r["peak_mem_bytes"] is not None}
        e["error"] = {r["N"]: r["error"] for r in ok if r.get("error") is not None}
        e["roof"] = {r["N"]: r["roof_fraction"] for r in ok
                     if r.get("roof_fraction") is not None and r["roof_fraction"] <= 1}
        e["effective_hparams"] = {r["N"]: r["effective_hparams"] for r in rs
                                  if r.get("effective_hparams") is not None}
        e["status"] = {r["N"]: r["status"] for r in rs if not _ok(r)}
        e["message"] = {r["N"]: r.get("message", "") for r in rs if not _ok(r)}
        e["time_exponent"], e["time_fit_range"] = _fit(e["time"])
        e["memory_exponent"], e["memory_fit_range"] = _fit(e["memory"])
        e["max_error"] = max(e["error"].values(), default=None)
        e["best_roof"] = max(e["roof"].values(), default=None)
        out.append(e)
    _attach_baselines(out, baseline)
    return _sorted(out)


def _attach_baselines(entries: list[dict], baseline: str) -> None:
    by_config: dict[tuple, list[dict]] = {}
    for e in entries:
        by_config.setdefault(_config(e), []).append(e)
    for es in by_config.values():
        cands = sorted((e for e in es if e["mechanism"] == baseline),
                       key=lambda e: (e["label"] != baseline, e["label"]))
        base = cands[0] if cands else None
        for e in es:
            e["baseline"] = base["label"] if base else None
            e["is_baseline"] = e is base
            bt = base["time"] if base else {}
            e["speedup"] = {n: bt[n] / t for n, t in sorted(e["time"].items()) if n in bt and t > 0}
            e["crossover"] = None
            if base is None:
                e["crossover_note"] = "no baseline"
            elif e is base:
                e["crossover_note"] = "baseline"
            elif not e["speedup"]:
                e["crossover_note"] = "no common lengths"
            else:
                ns = list(e["speedup"])
                e["crossover"] = crossover(ns, [e["time"][n] for n in ns], [bt[n] for n in ns])
                e["crossover_note"] = "ok" if e["crossover"] is not None else "never"


def _sorted(entries: list[dict]) -> list[dict]:
    by_config: dict[tuple, list[dict]] = {}
    for e in entries:
        by_config.setdefault(_config(e), []).append(e)
    out = []
    for cfg in sorted(by_config, key=lambda c: tuple(map(str, c))):
        es = by_config[cfg]
        timed = [e for e in es if e["time"]]
        common = set.intersection(*(set(e["time"]) for e in timed)) if timed else set()
        ref = max(common, default=max((n for e in timed for n in e["time"]), default=None))

        def key(e, ref=ref):
            if ref in e["time"]:
                return (0, e["time"][ref], e["label"])
            return (1, -max(e["time"], default=-math.inf), e["label"])

        out += sorted(es, key=key)
    return out


# ----------------------------------------------------------------------------- rendering

def _word_cell(status: str) -> str:
    w = status_word(status)
    return f"[{_STYLES.get(w, 'red')}]{w}[/]"


def _point_cell(e: dict, n: int, values: dict, fmt) -> str:
    if n in e["status"]:
        return _word_cell(e["status"][n])
    return fmt(values[n]) if n in values else "-"


def describe_crossover(e: dict) -> str:
    """A :func:`summarise` entry's crossover in words: ``~3330`` (interpolated), ``<=256``
    (already faster at the first common length), ``>16k`` (never faster up to the largest
    common length), ``(baseline)``, or ``-`` (no baseline or no common length)."""
    note = e["crossover_note"]
    if note == "ok":
        first = min(e["speedup"])
        if e["crossover"] == first and e["speedup"][first] >= 1:
            return "<=" + format_length(first)
        return "~" + format_length(e["crossover"])
    if note == "never":
        return ">" + format_length(max(e["speedup"]))
    return "(baseline)" if note == "baseline" else "-"


def _pass(e: dict) -> str:
    return e["pass_"] + (" causal" if e["causal"] else "")


def row_hparams(e: dict) -> str:
    """A :func:`summarise` entry's hyperparameters as built (see
    :func:`~attnlab.bench.formatting.describe_hparams`); the label stays the grid's."""
    return describe_hparams(e.get("effective_hparams") or {}, e.get("hparams"))


def _config_text(e: dict) -> str:
    return f"{e['dtype']} B={e['batch']} H={e['heads']} D={e['head_dim']} {e['device']}"


def render_table(summary: Sequence[dict], lengths: Sequence[int] | None = None,
                 title: str | None = None) -> Table:
    """A rich table of a :func:`summarise` result: the hyperparameters each row ran with (as
    built, :func:`row_hparams`), time per length, memory at the largest length, exponents,
    crossover, max error. Non-ok points show their status word
    (``OOM``, ``FAILED``, ``timeout``, ...), never a number."""
    ns = sorted(set(lengths) if lengths is not None else
                {n for e in summary for n in (*e["time"], *e["status"])})
    configs = {_config_text(e) for e in summary}
    bases = {e["baseline"] for e in summary if e["baseline"]}
    bases = {next(e["mechanism"] for e in summary if e["label"] == b) for b in bases}
    if title is None and len(configs) == 1:
        title = "time per call: " + next(iter(configs))
    table = Table(title=title)
    table.add_column("mechanism", no_wrap=True)  # labels are copied into commands
    table.add_column("pass")
    table.add_column("hparams (as built)")
    if len(configs) > 1:
        table.add_column("config")
    for n in ns:
        table.add_column(f"N={format_length(n)}", justify="right")
    if ns:
        table.add_column(f"mem @ {format_length(ns[-1])}", justify="right")
    for col in ("t ~ N^a", "mem ~ N^a", f"crossover vs {'/'.join(sorted(bases)) or '-'}",
                "max error"):
        table.add_column(col, justify="right")
    for e in summary:
        cells = [e["label"], _pass(e), row_hparams(e)]
        cells += [_config_text(e)] if len(configs) > 1 else []
        cells += [_point_cell(e, n, e["time"], format_time) for n in ns]
        if ns:
            cells.append(_point_cell(e, ns[-1], e["memory"], format_bytes))
        cells += [f"{a:.2f}" if a is not None else "-"
                  for a in (e["time_exponent"], e["memory_exponent"])]
        cells.append(describe_crossover(e))
        cells.append(f"{e['max_error']:.1e}" if e["max_error"] is not None else "-")
        table.add_row(*cells)
    return table


# ----------------------------------------------------------------------------- comparing

_MATCH = ("label", "N", "batch", "heads", "head_dim", "dtype", "pass_", "causal", "device")


def compare_runs(rows_a: Iterable[dict], rows_b: Iterable[dict]) -> list[dict]:
    """Match the points of two runs by ``label, N, batch, heads, head_dim, dtype, pass_,
    causal, device``. One entry per point present in either run, with the match keys,
    ``status_a`` / ``status_b`` (``None`` when absent from that run), ``time_a`` /
    ``time_b`` and ``mem_a`` / ``mem_b`` (ok points only), and ``time_ratio`` /
    ``mem_ratio`` = b / a (only when both are ok and measured; < 1 means b is faster/smaller).
    """
    index = []
    for name, rows in (("rows_a", rows_a), ("rows_b", rows_b)):
        d: dict[tuple, dict] = {}
        for r in _check(rows, f"compare_runs({name})"):
            k = tuple(r[m] for m in _MATCH)
            if k in d:
                raise ValueError(f"compare_runs: {name} has two rows for the same point {k}")
            d[k] = r
        index.append(d)
    a, b = index
    out = []
    for k in sorted(set(a) | set(b), key=lambda k: tuple(map(str, k[2:])) + (k[0], k[1])):
        ra, rb = a.get(k), b.get(k)
        e = dict(zip(_MATCH, k, strict=True))
        e["status_a"] = ra["status"] if ra else None
        e["status_b"] = rb["status"] if rb else None
        for field, col in (("time_s", "time"), ("peak_mem_bytes", "mem")):
            va = ra[field] if ra and _ok(ra) else None
            vb = rb[field] if rb and _ok(rb) else None
            e[f"{col}_a"], e[f"{col}_b"] = va, vb
            e[f"{col}_ratio"] = vb / va if va and vb is not None else None
        out.append(e)
    return out


def _ratio_cell(x: float | None, tol: float = 0.1) -> str:
    if x is None:
        return "-"
    style = "green" if x < 1 - tol else "red" if x > 1 + tol else ""
    return f"[{style}]{x:.2f}x[/]" if style else f"{x:.2f}x"


def render_compare(comparison: Sequence[dict], name_a: str = "A", name_b: str = "B",
                   title: str | None = None) -> Table:
    """A rich table of :func:`compare_runs`: per point, both times and statuses and the
    ratios b/a (green: b at least 10% faster/smaller, red: at least 10% slower/larger)."""
    table = Table(title=title or f"run {name_b} vs run {name_a} (ratio = {name_b} / {name_a})")
    for col in ("mechanism", "pass", "config", "N"):
        table.add_column(col, no_wrap=col == "mechanism")
    for col in (f"time {name_a}", f"time {name_b}", "time ratio", f"mem {name_a}",
                f"mem {name_b}", "mem ratio"):
        table.add_column(col, justify="right")

    def cell(status, value, fmt):
        if status is None:
            return "[dim]absent[/]"
        return _word_cell(status) if status != "ok" else fmt(value) if value is not None else "-"

    for e in comparison:
        table.add_row(e["label"], _pass(e), _config_text(e), format_length(e["N"]),
                      cell(e["status_a"], e["time_a"], format_time),
                      cell(e["status_b"], e["time_b"], format_time), _ratio_cell(e["time_ratio"]),
                      cell(e["status_a"], e["mem_a"], format_bytes),
                      cell(e["status_b"], e["mem_b"], format_bytes), _ratio_cell(e["mem_ratio"]))
    return table
