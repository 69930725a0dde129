"""The leaderboard of ``attnlab compare``: one row per mechanism, speed and quality side by side.

Input: benchmark rows (``Store.measurements``: ``mechanism``, ``label``, ``N``, ``pass_``,
``causal``, ``status``, ``time_s``, ``peak_mem_bytes``, ``roof_fraction``) and training rows
(``Store.trainings``: ``mechanism``, ``model``, ``seed``, ``metric``, ``mode``, ``test_value``,
``parameters``, ``throughput``, ``summary`` with ``convergence: {step, time}``).

A bench row is named by its ``label``. A ``transformer`` training belongs to the bench row
whose label equals its ``mechanism``, else to the one whose ``mechanism`` does (first label in
sort order); with no bench row it gets a row of its own. Trainings of other models (``lstm``,
``unet``, ...) are baselines: one row per model, with no bench figures.

Quality over seeds (:mod:`attnlab.stats`): the mean, the *sample* standard deviation
(``None`` for a single seed: one run says nothing about the spread) and the 95% Student-t
confidence interval of the mean (none for a single seed). Each trained row is compared with
the best row and with :data:`BASELINE` by Welch's t-test over their seeds
(:func:`attnlab.stats.welch`): a difference is *significant* when ``p < ALPHA``, and only
then is it a finding; the rendered table marks it (:data:`LEGEND`). The time exponent is
the slope ``a`` of ``t(N) ~ c N^a`` fitted as :func:`~attnlab.bench.analysis.summarise`
does (on ``N >= FIT_MIN_N`` when two such lengths were measured ok, else on all ok lengths),
so the leaderboard and ``attnlab bench`` agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from attnlab import stats
from attnlab.bench.analysis import (
    FIT_MIN_N,
    crossover,
    fit_exponent,
    format_length,
    format_time,
    status_word,
)
from attnlab.util.fmt import format_mib

__all__ = ["BASELINE", "LEGEND", "baseline_row", "headline_view", "leaderboard", "quality_text",
           "render_leaderboard", "seeds_text", "verdict"]

#: The mechanism whose time every other one's crossover is measured against, and whose
#: quality every other one's is tested against.
BASELINE = "sdpa"
_MODEL = "transformer"  # the model whose trainings compare attention mechanisms
#: How to read the "vs best" and "vs sdpa" columns of :func:`render_leaderboard`.
LEGEND = (f"vs best / vs {BASELINE}: Welch's t-test over seeds; ▲ significantly better, "
          f"▼ significantly worse (p < {stats.ALPHA:g}), = not significantly different "
          f"(p >= {stats.ALPHA:g}: the difference is within the seed-to-seed spread), "
          f"untested: fewer than 2 seeds on a side")


def _mean(xs: list[float]) -> float | None:
    return stats.mean(xs) if xs else None


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
    ts = sorted(ts, key=lambda t: t.get("seed") or 0)
    tests = _present(ts, lambda t: t.get("test_value"))
    params = [t.get("parameters") for t in ts if t.get("parameters") is not None]
    ci = stats.confidence_interval(tests) if tests else None
    row.update(
        metric=metric, mode=mode, n_seeds=len(tests), test_mean=_mean(tests),
        test_std=stats.std(tests) if tests else None, test_values=tests,
        test_ci_low=ci.low if ci else None, test_ci_high=ci.high if ci else None,
        convergence_step=_mean(_present(ts, lambda t: _convergence(t, "step"))),
        convergence_time=_mean(_present(ts, lambda t: _convergence(t, "time"))),
        parameters=params[0] if params else None,
        throughput=_mean(_present(ts, lambda t: t.get("throughput"))))


def headline_view(measurements: list[dict]) -> tuple[str, bool]:
    """``(pass_, causal)`` a report's leaderboard shows: the fwd+bwd pass when it ran (what
    training costs), causal when every point was (a suite benchmarks causal attention only:
    its studies decode left to right)."""
    passes = {r["pass_"] for r in measurements if r["status"] == "ok"}
    pass_ = "fwd+bwd" if "fwd+bwd" in passes else "fwd"
    return pass_, bool(measurements) and all(r["causal"] for r in measurements)


def leaderboard(measurements: list[dict], trainings: list[dict], *, pass_: str = "fwd",
                causal: bool = False) -> list[dict]:
    """One row per mechanism (and per baseline model), best first.

    Each row: ``name``, ``mechanism``, ``model``; ``time`` and ``memory`` (N -> seconds /
    bytes, or the status string of a non-ok point) for ``pass_`` and ``causal``;
    ``roof_fraction`` at the largest ok length ``roof_N``; ``time_exponent``; ``crossover``
    vs :data:`BASELINE` with ``crossover_note`` (``ok``, ``never``, ``baseline``,
    ``no baseline``, ``no common lengths``, ``-``); ``metric``, ``mode``, ``test_mean``,
    ``test_std`` (sample), ``test_values`` (one per seed, in seed order), ``test_ci_low`` and
    ``test_ci_high`` (the 95% interval of the mean, None for one seed), ``n_seeds``,
    ``convergence_step``, ``convergence_time`` (means), ``parameters``, ``throughput``
    (mean); ``is_best``, and ``vs_best`` / ``vs_baseline``: the
    :class:`~attnlab.stats.Difference` of this row's seeds against the best row's and
    :func:`baseline_row`'s (None for that row itself, for an untrained row, or with no
    trained baseline).

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
    out = _sorted(out)
    _attach_significance(out)
    return out


def baseline_row(rows: Sequence[dict]) -> dict | None:
    """The trained row of :data:`BASELINE`: the row named so, else its first label."""
    cands = sorted((r for r in rows if r["mechanism"] == BASELINE and r["model"] == _MODEL
                    and r.get("test_values")), key=lambda r: (r["name"] != BASELINE, r["name"]))
    return cands[0] if cands else None


def _attach_significance(rows: list[dict]) -> None:
    trained = [r for r in rows if r["test_mean"] is not None]  # best first (sorted)
    best = trained[0] if trained else None
    base = baseline_row(trained)
    for r in rows:
        r["is_best"] = r is best
        ok = r["test_mean"] is not None
        r["vs_best"] = stats.welch(r["test_values"], best["test_values"]) \
            if ok and r is not best else None
        r["vs_baseline"] = stats.welch(r["test_values"], base["test_values"]) \
            if ok and base is not None and r is not base else None


def verdict(d: stats.Difference, mode: str) -> str:
    """``"better"``, ``"worse"`` (significant, in the sense of ``mode``: ``"max"`` = larger
    is better), ``"same"`` (not significant) or ``"untested"`` (too few seeds)."""
    if not d.tested:
        return "untested"
    if not d.significant:
        return "same"
    return "better" if (d.diff > 0) == (mode == "max") else "worse"


def seeds_text(d: stats.Difference) -> str:
    """``"2 seeds"`` when both sides have as many, else ``"3 vs 2 seeds"``."""
    if d.n_a == d.n_b:
        return f"{d.n_a} seed" + ("s" if d.n_a != 1 else "")
    return f"{d.n_a} vs {d.n_b} seeds"


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
    """``mean ± half-width of the 95% CI`` of a row's test metric, ``-`` without one; one
    seed has no interval, and the text says so."""
    if r["test_mean"] is None:
        return "-"
    if r["test_ci_low"] is None:
        why = "1 seed" if r["n_seeds"] == 1 else "non-finite value"
        return f"{r['test_mean']:.4g} ({why}: no CI)"
    return f"{r['test_mean']:.4g} ± {(r['test_ci_high'] - r['test_ci_low']) / 2:.2g}"


_MARK = {"better": "▲", "worse": "▼", "same": "="}


def _vs_text(r: dict, d: stats.Difference | None, itself: bool, name: str) -> str:
    if r["test_mean"] is None or (d is None and not itself):
        return "-"
    if itself:
        return name
    v = verdict(d, r["mode"])
    return f"untested ({seeds_text(d)})" if v == "untested" else f"{_MARK[v]} {stats.format_p(d.p)}"


def _opt(v, fmt) -> str:
    return "-" if v is None else fmt(v)


def render_leaderboard(rows: Sequence[dict], lengths: Sequence[int]
                       ) -> tuple[list[str], list[list[str]]]:
    """Column titles and one list of strings per row: the quality columns (test metric as
    mean ± 95% CI, its significance against the best and :data:`BASELINE` as
    :data:`LEGEND` says), then time and memory (MiB) per length in ``lengths``, roofline
    fraction, exponent and crossover. A non-ok point shows its status word (``OOM``,
    ``FAILED``, ...), a missing one ``-``."""
    ns = sorted(set(lengths))
    metrics = sorted({r["metric"] for r in rows if r["metric"]})
    base = baseline_row(rows)
    cols = ["mechanism", f"test {'/'.join(metrics) or 'metric'}", "vs best", f"vs {BASELINE}",
            "seeds", "parameters", "conv. step", "conv. time", "throughput"]
    cols += [f"time N={format_length(n)}" for n in ns]
    cols += [f"mem N={format_length(n)}" for n in ns]
    cols += ["roof", "t ~ N^a", f"crossover vs {BASELINE}"]
    out = []
    for r in rows:
        cells = [r["name"] if r["model"] == _MODEL else f"{r['name']} (baseline)", quality_text(r),
                 _vs_text(r, r["vs_best"], r["is_best"], "best"),
                 _vs_text(r, r["vs_baseline"], r is base, BASELINE),
                 str(r["n_seeds"]) if r["n_seeds"] else "-",
                 _opt(r["parameters"], lambda p: f"{p:,}"),
                 _opt(r["convergence_step"], lambda s: f"{s:.0f}"),
                 _opt(r["convergence_time"], format_time),
                 _opt(r["throughput"], lambda t: f"{t:.3g}/s")]
        cells += [_point(r["time"], n, format_time) for n in ns]
        cells += [_point(r["memory"], n, format_mib) for n in ns]
        cells += [_opt(r["roof_fraction"], lambda f: f"{f:.0%}"),
                  _opt(r["time_exponent"], lambda a: f"{a:.2f}"), _crossover_text(r)]
        out.append(cells)
    return cols, out
