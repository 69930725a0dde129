"""The leaderboard of ``attnlab compare``: one row per mechanism, speed and quality side by side.

Input: benchmark rows (``Store.measurements``: ``mechanism``, ``label``, ``N``, ``pass_``,
``causal``, ``status``, ``time_s``, ``peak_mem_bytes``, ``roof_fraction``) and training rows
(``Store.trainings``: ``mechanism``, ``model``, ``seed``, ``metric``, ``mode``, ``test_value``,
``parameters``, ``throughput``, ``summary`` with ``convergence: {step, time}``).

A bench row is named by its ``label``. A ``transformer`` training belongs to the bench row
whose label equals its ``mechanism``, else to the one whose ``mechanism`` does (first label in
sort order); with no bench row it gets a row of its own. Trainings of other models (``lstm``,
``unet``, ...) are baselines: one row per model, with no bench figures.

Quality over seeds: the mean ``m = sum(x_i) / n`` and the *sample* standard deviation
``s = sqrt(sum((x_i - m)^2) / (n - 1))`` (``None`` for a single seed: one run says nothing
about the spread). The time exponent is the slope ``a`` of ``t(N) ~ c N^a`` fitted as
:func:`~attnlab.bench.analysis.summarise` does (on ``N >= FIT_MIN_N`` when two such lengths
were measured ok, else on all ok lengths), so the leaderboard and ``attnlab bench`` agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from attnlab.bench.analysis import (
    FIT_MIN_N,
    crossover,
    fit_exponent,
    format_length,
    format_time,
    status_word,
)

__all__ = ["BASELINE", "leaderboard", "quality_text", "render_leaderboard"]

#: The mechanism whose time every other one's crossover is measured against.
BASELINE = "sdpa"
_MODEL = "transformer"  # the model whose trainings compare attention mechanisms


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _present(rows: list[dict], key) -> list[float]:
    vals = [key(r) for r in rows]
    return [float(v) for v in vals if v is not None]


def _convergence(r: dict, field: str):
    conv = (r.get("summary") or {}).get("convergence") or {}
    return conv.get(field)


def _bench_row(name: str, rs: list[dict]) -> dict:
    seen: dict[int, dict] = {}
    for r in rs:
        if r["N"] in seen:
            raise ValueError(f"leaderboard: two measurements of {name!r} at N={r['N']} for the "
                             f"same pass and causality (several dtypes or shapes?); pass the "
                             f"rows of one configuration")
        seen[r["N"]] = r
    ok = {n: r for n, r in sorted(seen.items()) if r["status"] == "ok"}
    # A non-ok point carries its status word, never a number (it was not measured).
    time = {n: (r["time_s"] if r["status"] == "ok" else r["status"])
            for n, r in sorted(seen.items()) if r["status"] != "ok" or r["time_s"] is not None}
    mem = {n: (r["peak_mem_bytes"] if r["status"] == "ok" else r["status"])
           for n, r in sorted(seen.items())
           if r["status"] != "ok" or r["peak_mem_bytes"] is not None}
    timed = {n: r["time_s"] for n, r in ok.items() if r["time_s"] is not None}
    ns = sorted(timed)
    big = [n for n in ns if n >= FIT_MIN_N]
    use = big if len(big) >= 2 else ns
    roof_n = max(ok, default=None)
    return {"name": name, "mechanism": rs[0]["mechanism"], "model": _MODEL, "time": time,
            "memory": mem, "_ok_time": timed,
            "roof_fraction": ok[roof_n].get("roof_fraction") if roof_n is not None else None,
            "roof_N": roof_n,
            "time_exponent": fit_exponent(use, [timed[n] for n in use])}


def _empty_row(name: str, mechanism: str, model: str) -> dict:
    return {"name": name, "mechanism": mechanism, "model": model, "time": {}, "memory": {},
            "_ok_time": {}, "roof_fraction": None, "roof_N": None, "time_exponent": None}


def _attach_crossover(rows: list[dict]) -> None:
    cands = sorted((r for r in rows if r["mechanism"] == BASELINE and r["_ok_time"]),
                   key=lambda r: (r["name"] != BASELINE, r["name"]))
    base = cands[0] if cands else None
    for r in rows:
        r["crossover"] = None
        if not r["time"]:
            r["crossover_note"] = "-"  # a baseline model or an unmeasured mechanism
        elif base is None:
            r["crossover_note"] = "no baseline"
        elif r is base:
            r["crossover_note"] = "baseline"
        else:
            ns = sorted(set(r["_ok_time"]) & set(base["_ok_time"]))
            if not ns:
                r["crossover_note"] = "no common lengths"
                continue
            r["crossover"] = crossover(ns, [r["_ok_time"][n] for n in ns],
                                       [base["_ok_time"][n] for n in ns])
            r["crossover_note"] = "ok" if r["crossover"] is not None else "never"
            r["crossover_max_N"] = ns[-1]


def _attach_quality(row: dict, ts: list[dict]) -> None:
    metrics = {(t["metric"], t["mode"]) for t in ts}
    if len(metrics) > 1:
        raise ValueError(f"leaderboard: trainings of {row['name']!r} report different metrics "
                         f"or modes {sorted(metrics)}; pass the trainings of one task")
    metric, mode = next(iter(metrics)) if metrics else (None, None)
    tests = _present(ts, lambda t: t.get("test_value"))
    params = [t.get("parameters") for t in ts if t.get("parameters") is not None]
    row.update(
        metric=metric, mode=mode, n_seeds=len(tests), test_mean=_mean(tests),
        test_std=_std(tests),
        convergence_step=_mean(_present(ts, lambda t: _convergence(t, "step"))),
        convergence_time=_mean(_present(ts, lambda t: _convergence(t, "time"))),
        parameters=params[0] if params else None,
        throughput=_mean(_present(ts, lambda t: t.get("throughput"))))


def leaderboard(measurements: list[dict], trainings: list[dict], *, pass_: str = "fwd",
                causal: bool = False) -> list[dict]:
    """One row per mechanism (and per baseline model), best first.

    Each row: ``name``, ``mechanism``, ``model``; ``time`` and ``memory`` (N -> seconds /
    bytes, or the status string of a non-ok point) for ``pass_`` and ``causal``;
    ``roof_fraction`` at the largest ok length ``roof_N``; ``time_exponent``; ``crossover``
    vs :data:`BASELINE` with ``crossover_note`` (``ok``, ``never``, ``baseline``,
    ``no baseline``, ``no common lengths``, ``-``); ``metric``, ``mode``, ``test_mean``,
    ``test_std`` (sample), ``n_seeds``, ``convergence_step``, ``convergence_time`` (means),
    ``parameters``, ``throughput`` (mean).

    Order: rows with a test metric, best mean first (``mode`` ``max`` or ``min``); then the
    rest by time at the largest length every one of them measured ok (fastest first), the
    ones without a time there last. Ties go to the name that sorts first.
    """
    ms = [m for m in measurements if m["pass_"] == pass_ and bool(m["causal"]) == bool(causal)]
    by_label: dict[str, list[dict]] = {}
    for m in ms:
        by_label.setdefault(m["label"], []).append(m)
    rows = {name: _bench_row(name, rs) for name, rs in sorted(by_label.items())}

    groups: dict[str, list[dict]] = {}
    for t in trainings:
        if t["model"] != _MODEL:
            key = t["model"]
            rows.setdefault(key, _empty_row(key, t["mechanism"], t["model"]))
        elif t["mechanism"] in rows:
            key = t["mechanism"]
        else:
            key = next((n for n, r in rows.items() if r["mechanism"] == t["mechanism"]
                        and r["model"] == _MODEL), t["mechanism"])
            rows.setdefault(key, _empty_row(key, t["mechanism"], _MODEL))
        groups.setdefault(key, []).append(t)
    out = list(rows.values())
    for r in out:
        _attach_quality(r, groups.get(r["name"], []))
    _attach_crossover(out)
    return _sorted(out)


def _sorted(rows: list[dict]) -> list[dict]:
    trained = [r for r in rows if r["test_mean"] is not None]
    modes = {r["mode"] for r in trained}
    if len(modes) > 1:
        raise ValueError(f"leaderboard: trainings mix modes {sorted(modes)}; pass one task")
    sign = -1.0 if modes == {"max"} else 1.0  # "max": larger is better, so sort descending
    trained.sort(key=lambda r: (sign * r["test_mean"], r["name"]))
    rest = [r for r in rows if r["test_mean"] is None]
    timed = [r for r in rest if r["_ok_time"]]
    common = set.intersection(*(set(r["_ok_time"]) for r in timed)) if timed else set()
    ref = max(common, default=None)
    rest.sort(key=lambda r: (0, r["_ok_time"][ref], r["name"]) if ref in r["_ok_time"]
              else (1, 0.0, r["name"]))
    out = trained + rest
    for r in out:
        del r["_ok_time"]
    return out


# ----------------------------------------------------------------------------- rendering

def _mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def _point(values: dict, n: int, fmt) -> str:
    if n not in values:
        return "-"
    v = values[n]
    return status_word(v) if isinstance(v, str) else fmt(v)


def _crossover_text(r: dict) -> str:
    note = r["crossover_note"]
    if note == "ok":
        return "~" + format_length(r["crossover"])
    if note == "never":
        return ">" + format_length(r["crossover_max_N"])
    return "(baseline)" if note == "baseline" else "-"


def quality_text(r: dict) -> str:
    """``mean ± std`` of a row's test metric (no std for one seed), ``-`` without one."""
    if r["test_mean"] is None:
        return "-"
    std = f" ± {r['test_std']:.2g}" if r["test_std"] is not None else ""
    return f"{r['test_mean']:.4g}{std}"


def _opt(v, fmt) -> str:
    return "-" if v is None else fmt(v)


def render_leaderboard(rows: Sequence[dict], lengths: Sequence[int]
                       ) -> tuple[list[str], list[list[str]]]:
    """Column titles and one list of strings per row: the quality columns, then time and
    memory (MiB) per length in ``lengths``, roofline fraction, exponent and crossover.
    A non-ok point shows its status word (``OOM``, ``FAILED``, ...), a missing one ``-``."""
    ns = sorted(set(lengths))
    metrics = sorted({r["metric"] for r in rows if r["metric"]})
    cols = ["mechanism", f"test {'/'.join(metrics) or 'metric'}", "seeds", "parameters",
            "conv. step", "conv. time", "throughput"]
    cols += [f"time N={format_length(n)}" for n in ns]
    cols += [f"mem N={format_length(n)}" for n in ns]
    cols += ["roof", "t ~ N^a", f"crossover vs {BASELINE}"]
    out = []
    for r in rows:
        cells = [r["name"] if r["model"] == _MODEL else f"{r['name']} (baseline)", quality_text(r),
                 str(r["n_seeds"]) if r["n_seeds"] else "-",
                 _opt(r["parameters"], lambda p: f"{p:,}"),
                 _opt(r["convergence_step"], lambda s: f"{s:.0f}"),
                 _opt(r["convergence_time"], format_time),
                 _opt(r["throughput"], lambda t: f"{t:.3g}/s")]
        cells += [_point(r["time"], n, format_time) for n in ns]
        cells += [_point(r["memory"], n, _mib) for n in ns]
        cells += [_opt(r["roof_fraction"], lambda f: f"{f:.0%}"),
                  _opt(r["time_exponent"], lambda a: f"{a:.2f}"), _crossover_text(r)]
        out.append(cells)
    return cols, out
