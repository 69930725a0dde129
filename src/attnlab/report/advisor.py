"""Which mechanism to use at sequence length N, under a memory budget: :func:`advise`.

Input: benchmark rows (the schema of ``attnlab bench``'s store: ``mechanism``, ``label``,
``N``, ``pass_``, ``causal``, ``status``, ``time_s``, ``peak_mem_bytes``) and optionally
training quality per mechanism (``{"mean", "std", "metric", "mode", "values"}``, ``mode``
``"max"`` or ``"min"``, ``values`` the per-seed results, optional). A mechanism is named by
its ``label`` when the row has one, else ``mechanism``; its quality is looked up by that
name, then by its ``mechanism``.

The steps, each logged in :attr:`Advice.reasoning` with its numbers:

1. Keep the rows of the requested ``pass_`` and ``causal``. Only ``ok`` rows give numbers.
2. Exclude a mechanism whose correctness gate ``FAILED`` (at any length: it is wrong, not
   slow), that has an ``oom`` or ``timeout`` at a length ``<= N`` (it did not run there,
   so it will not run at N), or another non-ok status (``error``, ``unsupported``, ...)
   exactly at N, or no ok row at all.
3. Time and memory at N, each from its own ok points:

   * **measured** when N itself was measured;
   * **interpolated** in log-log between the nearest measured lengths ``n0 < N < n1``:
     ``log y = log y0 + (log N - log n0) / (log n1 - log n0) * (log y1 - log y0)``,
     exact for a power law ``y = c N^a`` on that interval;
   * **extrapolated** otherwise: ``y = y_ref * (N / n_ref)^a`` anchored at the nearest
     measured length ``n_ref``. Above the data, ``a`` is fitted as the table's exponent is
     (:func:`~attnlab.bench.analysis.fit_exponent` on ``N >= FIT_MIN_N`` when two such
     lengths exist, else on all); below it, ``a`` is the slope of the two smallest lengths
     (the fixed overheads of small N make the large-N slope wrong there).
     With a single measured length there is no exponent and the mechanism is excluded.
     Above the data ``a`` is capped at :data:`MAX_EXPONENT` (= 2: no mechanism is worse
     than quadratic in N; a steeper fit on short lengths measures overheads, not scaling).

   Every time and memory figure the advice shows, in its tables, answers and reasoning,
   carries how it was obtained: ``(measured)``, ``(interpolated from N=a..b)`` or
   ``(extrapolated from N=a..b)`` (the measured lengths it came from).
4. Exclude a mechanism whose memory at N is over ``memory_budget_bytes`` (or unknown while
   a budget is set).
5. ``fastest``: least time. ``most_accurate``: best quality mean (``mode``) among the fits
   that have quality. ``recommended``: the fastest of the fits that are *as accurate as the
   best*, which quality differences decide only when they are significant: a fit is as
   accurate unless Welch's t-test over the seeds (:func:`attnlab.stats.welch`) finds it
   significantly worse than the most accurate (``p < ALPHA``). Where either side has fewer
   than 2 per-seed ``values`` there is no test; the advice says so, and falls back on the
   means: within :data:`TOLERANCE` of the best (``max``: ``q >= best - 0.01 |best|``;
   ``min``: ``q <= best + 0.01 |best|``) counts as accurate as the best. Fits with no quality cannot
   be vouched for and are not candidates. With no quality at all, ``recommended`` is
   ``fastest``. Ties go to the faster, then to the name that sorts first. Each rated fit
   gets ``vs_best``: ``{"as_good", "tested", "p", "text"}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attnlab import stats
from attnlab.bench.analysis import FIT_MIN_N, fit_exponent, format_length, format_time
from attnlab.util.fmt import format_mib

__all__ = ["MAX_EXPONENT", "TOLERANCE", "Advice", "advise", "answers", "fit_rows",
           "memory_text", "quality_text", "render_advice", "time_text"]

#: Relative quality margin within which a faster mechanism is preferred to the best one,
#: used only when there are too few seeds for a significance test.
TOLERANCE = 0.01
#: No registered mechanism costs more than O(N^2) time or memory at a fixed head size, so a
#: steeper fit (small-N overheads: allocator granularity, caches) is capped above the data.
MAX_EXPONENT = 2.0
_PASSES = ("fwd", "fwd+bwd")
_RANK = {"measured": 0, "interpolated": 1, "extrapolated": 2}
_MIB = 2**20


@dataclass(frozen=True)
class Advice:
    """The result of :func:`advise`.

    ``fits``: one dict per mechanism that can run at N (sorted fastest first): ``name``,
    ``mechanism``, ``time_s``, ``peak_mem_bytes`` (None if never measured), ``estimate``
    (the least certain of ``time_estimate`` and ``mem_estimate``: ``"measured"``,
    ``"interpolated"`` or ``"extrapolated"``), ``time_label`` and ``mem_label`` (how each
    was obtained, as :func:`time_text` shows it), ``quality`` (the quality dict or None)
    and, for rated fits, ``vs_best``.
    ``excluded``: one dict per other mechanism: ``name``, ``reason``.
    """

    n: int
    memory_budget_bytes: int | None
    fits: list[dict]
    excluded: list[dict]
    fastest: str | None
    most_accurate: str | None
    recommended: str | None
    reasoning: list[str]


def _estimate(points: dict[int, float], n: int) -> tuple[float, str, str, str] | None:
    """``(value, kind, how, label)`` of the quantity at ``n`` from ``points`` (N -> value >
    0), or None when it cannot be estimated (no point, or one point that is not ``n``)."""
    if n in points:
        return points[n], "measured", f"measured at N={n}", "measured"
    ns = sorted(points)
    below, above = [m for m in ns if m < n], [m for m in ns if m > n]
    if below and above:
        n0, n1 = below[-1], above[0]
        y0, y1 = points[n0], points[n1]
        frac = (math.log(n) - math.log(n0)) / (math.log(n1) - math.log(n0))
        y = math.exp(math.log(y0) + frac * (math.log(y1) - math.log(y0)))
        return (y, "interpolated", f"interpolated in log-log between N={n0} and N={n1}",
                f"interpolated from N={n0}..{n1}")
    if len(ns) < 2:
        return None
    if above:  # n below the data: slope of the first segment, anchored at the smallest
        use, ref = ns[:2], ns[0]
    else:
        big = [m for m in ns if m >= FIT_MIN_N]
        use, ref = (big if len(big) >= 2 else ns), ns[-1]
    a = fit_exponent(use, [points[m] for m in use])
    capped = not above and a > MAX_EXPONENT + 1e-9  # not a rounding of an exact N^2
    if capped:
        a_fit, a = a, MAX_EXPONENT
    y = points[ref] * (n / ref) ** a
    cap = f", capped from the fitted {a_fit:.2f}" if capped else ""
    return y, "extrapolated", (f"EXTRAPOLATED from N={ref} with N^{a:.2f} (fitted on "
                               f"N={use[0]}..{use[-1]}{cap}), an estimate beyond the "
                               f"measurements"), f"extrapolated from N={use[0]}..{use[-1]}"


def _rows_by_name(measurements: list[dict], pass_: str, causal: bool) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for i, r in enumerate(measurements):
        missing = [k for k in ("mechanism", "N", "pass_", "causal", "status") if k not in r]
        if missing:
            raise ValueError(f"measurements: row {i} lacks key(s) {missing}; expected bench rows, "
                             f"got keys {sorted(r)}")
        if r["pass_"] == pass_ and bool(r["causal"]) == causal:
            by.setdefault(r.get("label") or r["mechanism"], []).append(r)
    for name, rs in by.items():
        seen: dict[int, dict] = {}
        for r in rs:
            if r["N"] in seen:  # two dtypes, runs or batch sizes: the caller must choose one
                raise ValueError(f"measurements: two rows for {name!r} at N={r['N']} "
                                 f"(pass_={pass_}, causal={causal}); pass the rows of one "
                                 f"configuration (dtype, batch, heads, run)")
            seen[r["N"]] = r
    return by


def _check_quality(quality: dict[str, dict] | None) -> dict[str, dict]:
    quality = quality or {}
    for name, q in quality.items():
        if not isinstance(q, dict) or "mean" not in q or q.get("mode") not in ("max", "min"):
            raise ValueError(f"quality[{name!r}]: expected a dict with 'mean' and 'mode' "
                             f"('max' or 'min'), got {q!r}")
        vals = q.get("values")
        if vals is not None and (not isinstance(vals, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)):
            raise ValueError(f"quality[{name!r}]['values']: expected the per-seed results "
                             f"as a list of numbers, got {vals!r}")
    return quality


def _exclusion(rs: list[dict], n: int) -> str | None:
    bad = sorted((r["N"], r["status"]) for r in rs if r["status"] != "ok")
    failed = [m for m, s in bad if s == "FAILED"]
    if failed:
        return f"FAILED correctness gate (at N={failed[0]})"
    stopped = [(m, s) for m, s in bad if s in ("oom", "timeout") and m <= n]
    if stopped:
        m, s = stopped[0]
        return f"{s} at N={m} <= {n}"
    at_n = [s for m, s in bad if m == n]
    if at_n:
        return f"{at_n[0]} at N={n}"
    if not any(r["status"] == "ok" for r in rs):
        return "no data (no ok measurement)"
    return None


def _points(rs: list[dict], key: str) -> dict[int, float]:
    return {int(r["N"]): float(r[key]) for r in rs
            if r["status"] == "ok" and r.get(key) is not None and r[key] > 0}


def quality_text(q: dict) -> str:
    """``accuracy 0.41 ± 0.05 (95% CI, 3 seeds)`` from the per-seed ``values`` when given,
    else ``± std`` as given; one seed has no interval, and the text says so."""
    vals = q.get("values") or []
    ci = stats.confidence_interval(vals) if vals else None
    if ci is not None and ci.low is not None:
        spread = f" ± {ci.half_width:.2g} (95% CI, {len(vals)} seeds)"
    elif ci is not None:
        spread = f" ({ci.note})"
    else:
        spread = f" ± {q['std']:.4g} (sample std)" if q.get("std") is not None else ""
    return f"{q.get('metric') or 'quality'} {q['mean']:.4g}{spread}"


def time_text(f: dict) -> str:
    """A fit's time with how it was obtained: ``1.90 ms (extrapolated from N=256..1024)``."""
    return f"{format_time(f['time_s'])} ({f['time_label']})"


def memory_text(f: dict) -> str:
    """A fit's memory with how it was obtained, ``-`` if never measured."""
    if f["peak_mem_bytes"] is None:
        return "-"
    return f"{format_mib(f['peak_mem_bytes'])} ({f['mem_label']})"


def _fit(name: str, rs: list[dict], n: int, budget: int | None,
         why: list[str]) -> dict | str:
    """The fit dict of one mechanism at ``n`` (without its quality), or why it is excluded."""
    reason = _exclusion(rs, n)
    if reason:
        return reason
    t = _estimate(_points(rs, "time_s"), n)
    if t is None:
        return f"one measured length only (N={rs[0]['N']}), cannot estimate N={n}"
    m = _estimate(_points(rs, "peak_mem_bytes"), n)
    mem_text = f"memory {format_mib(m[0])} {m[2]}" if m else "memory not measured"
    why.append(f"{name}: time {format_time(t[0])} {t[2]}; {mem_text}.")
    if budget is not None:
        if m is None:
            return "memory not measured, cannot check the budget"
        if m[0] > budget:
            return (f"over budget by {format_mib(m[0] - budget)}: needs {format_mib(m[0])} "
                    f"({m[3]}) > budget {format_mib(budget)}")
    kinds = [t[1]] + ([m[1]] if m else [])
    return {"name": name, "mechanism": rs[0]["mechanism"], "time_s": t[0],
            "peak_mem_bytes": m[0] if m else None,
            "estimate": max(kinds, key=_RANK.__getitem__), "time_estimate": t[1],
            "mem_estimate": m[1] if m else None, "time_label": t[3],
            "mem_label": m[3] if m else None}


def advise(measurements: list[dict], n: int, memory_budget_bytes: int | None = None, *,
           quality: dict[str, dict] | None = None, pass_: str = "fwd+bwd",
           causal: bool = False) -> Advice:
    """The mechanisms that run at length ``n`` within ``memory_budget_bytes`` (bytes, None =
    no limit), the fastest, the most accurate and the recommended one; see the module
    docstring for every rule. ``ValueError`` for ``n < 1``, a negative budget, a pass other
    than ``"fwd"``/``"fwd+bwd"``, malformed rows or quality, or two rows of one point."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an integer sequence length >= 1, got {n!r}")
    if memory_budget_bytes is not None and memory_budget_bytes < 0:
        raise ValueError(f"memory_budget_bytes: expected None or >= 0 bytes, "
                         f"got {memory_budget_bytes!r}")
    if pass_ not in _PASSES:
        raise ValueError(f"pass_: expected one of {_PASSES}, got {pass_!r}")
    quality = _check_quality(quality)
    by = _rows_by_name(measurements, pass_, causal)
    budget = "no memory budget" if memory_budget_bytes is None else \
        f"memory budget {format_mib(memory_budget_bytes)}"
    why = [f"N={n}, pass {pass_}, causal={causal}, {budget}: {len(by)} mechanism(s) measured."]
    fits, excluded = [], []

    def exclude(name: str, reason: str) -> None:
        excluded.append({"name": name, "reason": reason})
        why.append(f"{name}: excluded, {reason}.")

    for name in sorted(by):
        got = _fit(name, by[name], n, memory_budget_bytes, why)
        if isinstance(got, str):
            exclude(name, got)
            continue
        got["quality"] = quality.get(name, quality.get(got["mechanism"]))
        fits.append(got)
    fits.sort(key=lambda f: (f["time_s"], f["name"]))  # ties: the name that sorts first
    fastest = fits[0]["name"] if fits else None
    if fastest:
        why.append(f"fastest: {fastest}, {time_text(fits[0])}.")
    else:
        why.append("no mechanism fits: nothing to recommend.")
    most_accurate, recommended = _by_quality(fits, why)
    if recommended is None and fastest:
        recommended = fastest
        why.append(f"recommended: {fastest}, the fastest (no quality results for the fits).")
    return Advice(n, memory_budget_bytes, fits, excluded, fastest, most_accurate, recommended,
                  why)


def _versus(f: dict, best: dict, sign: float) -> dict:
    """How ``f``'s quality stands against the most accurate fit's (module doc, step 5)."""
    q, b = f["quality"], best["quality"]
    va, vb = q.get("values") or [], b.get("values") or []
    d = stats.welch(va, vb) if len(va) >= 2 and len(vb) >= 2 else None
    if d is not None and d.tested:
        worse = d.significant and sign * d.diff < 0
        text = (f"{'' if worse else 'not '}significantly worse than {best['name']} "
                f"(Welch, {stats.format_p(d.p)}, {d.n_a} vs {d.n_b} seeds)")
        return {"as_good": not worse, "tested": True, "p": d.p, "text": text}
    m, lim = q["mean"], b["mean"] - sign * TOLERANCE * abs(b["mean"])
    close = sign * (m - lim) >= 0
    few = d.how if d is not None else \
        "no per-seed results" if not (va and vb) else "1 seed on a side, a test needs 2 each"
    text = (f"untested ({few}): {'within' if close else 'not within'} {TOLERANCE:.0%} of "
            f"{best['name']}'s mean ({'>=' if sign > 0 else '<='} {lim:.4g}), which is no "
            f"significance finding")
    return {"as_good": close, "tested": False, "p": None, "text": text}


def _by_quality(fits: list[dict], why: list[str]) -> tuple[str | None, str | None]:
    rated = [f for f in fits if f["quality"] is not None]  # already fastest first
    if not rated:
        return None, None
    modes = {f["quality"]["mode"] for f in rated}
    metrics = {f["quality"].get("metric") for f in rated}
    if len(modes) > 1 or len(metrics) > 1:
        raise ValueError(f"quality: the fits' entries must share one metric and mode, got "
                         f"metrics {sorted(map(str, metrics))} and modes {sorted(modes)}")
    sign = 1.0 if modes == {"max"} else -1.0
    # max() keeps the first of equal keys, and rated is fastest first: ties go to the faster
    best = max(rated, key=lambda f: sign * f["quality"]["mean"])
    why.append(f"most accurate: {best['name']}, {quality_text(best['quality'])}.")
    best["vs_best"] = {"as_good": True, "tested": None, "p": None, "text": "the most accurate"}
    for f in rated:
        if f is not best:
            v = f["vs_best"] = _versus(f, best, sign)
            verdict = "as accurate as" if v["as_good"] else "as less accurate than"
            why.append(f"{f['name']} {f['quality']['mean']:.4g}: {v['text']}; so it counts "
                       f"{verdict} the best.")
    rec = next(f for f in rated if f["vs_best"]["as_good"])
    why.append(f"recommended: {rec['name']}, the fastest of those as accurate as the best: "
               f"{time_text(rec)}.")
    return best["name"], rec["name"]


def _cell(s: str) -> str:
    return s.replace("|", "\\|")


def _quality_cell(f: dict) -> str:
    if not f["quality"]:
        return "-"
    return quality_text(f["quality"]) + (f"; {f['vs_best']['text']}" if f.get("vs_best") else "")


def fit_rows(advice: Advice) -> list[list[str]]:
    """One row of text per fit: name, time and memory (each with how it was obtained),
    estimate, quality and its comparison with the best (``-`` if none)."""
    return [[f["name"], time_text(f), memory_text(f), f["estimate"], _quality_cell(f)]
            for f in advice.fits]


def answers(advice: Advice) -> list[tuple[str, str]]:
    """``(what, text)`` for the fastest, the most accurate and the recommended mechanism,
    each text with the figures behind it, every one labelled as measured or estimated."""
    by = {f["name"]: f for f in advice.fits}
    out = []
    for what, name in (("Fastest", advice.fastest), ("Most accurate", advice.most_accurate),
                       ("Recommended", advice.recommended)):
        f = by.get(name)
        if f is None:
            out.append((what, "-"))
            continue
        parts = [time_text(f)] + ([memory_text(f)] if f["peak_mem_bytes"] is not None else [])
        if f["quality"]:
            parts.append(quality_text(f["quality"]))
        if what == "Recommended":
            parts.append(f["vs_best"]["text"] if f.get("vs_best") else
                         "no quality results for the fits: the fastest")
            untested = [g["name"] for g in advice.fits
                        if (g.get("vs_best") or {}).get("tested") is False]
            if untested:
                parts.append(f"too few seeds to test {', '.join(untested)} against the most "
                             f"accurate: judged by the means only")
        out.append((what, f"{name}: " + ", ".join(parts)))
    return out


def render_advice(advice: Advice) -> str:
    """Markdown: the fits (time, memory, how each was obtained, quality), the excluded
    mechanisms with their reasons, the three answers and the reasoning."""
    budget = ("none" if advice.memory_budget_bytes is None
              else format_mib(advice.memory_budget_bytes))
    out = [f"## Advice at N={format_length(advice.n)} (memory budget: {budget})", ""]
    if advice.fits:
        out += ["| mechanism | time | memory | estimate | quality |", "|---|---:|---:|---|---|"]
        for name, t, mem, est, q in fit_rows(advice):
            est = est if est == "measured" else f"**{est}**"
            out.append(f"| {_cell(name)} | {t} | {mem} | {est} | {_cell(q)} |")
        out.append("")
    if advice.excluded:
        out += ["Excluded:", ""]
        out += [f"- {_cell(e['name'])}: {e['reason']}" for e in advice.excluded]
        out.append("")
    out += [f"- **{what}**: {text}" for what, text in answers(advice)]
    out += ["", "### Reasoning", ""] + [f"1. {line}" for line in advice.reasoning]
    return "\n".join(out) + "\n"
