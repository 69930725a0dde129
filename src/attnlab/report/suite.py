"""The report of a suite (:mod:`attnlab.compare.suite`): every study side by side.

Each study keeps its full report (``RUN_DIR/<label>/report/``: curves, attention maps,
sparsity patterns, its advisor). This one answers the suite's question, which mechanism
to use: one table of test quality per study (mean ± 95% confidence interval over seeds,
marked where Welch's t-test finds a difference from the study's best and from
:data:`~attnlab.report.leaderboard.BASELINE`), the findings in words with their p-values,
the one benchmark sweep (time and memory per length, both passes), and the advisor at the
longest measured length, per study. Built only from stored results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from attnlab.bench.analysis import format_length, format_time
from attnlab.compare.suite import read_suite
from attnlab.files import read_json, writable_dir
from attnlab.report import sections
from attnlab.report.build import build_report, load_run
from attnlab.report.document import Report
from attnlab.report.leaderboard import LEGEND, headline_view, leaderboard, verdict
from attnlab.util.fmt import format_mib

__all__ = ["build_suite_report", "study_leaderboards"]

_MARK = {"better": "▲", "worse": "▼", "same": "=", "untested": "?"}
_SEPARATION_ALPHA_NOTE = "Welch's t-test over seeds, p < 0.05"


def _quality_cell(r: dict | None) -> str:
    if r is None or r.get("test_mean") is None:
        return "-"
    ci = "" if r.get("test_ci_low") is None else \
        f" ± {(r['test_ci_high'] - r['test_ci_low']) / 2:.3f}"
    mark = "best" if r["is_best"] else _MARK[verdict(r["vs_best"], r["mode"])]
    return f"{r['test_mean']:.3f}{ci} {mark}"


def study_leaderboards(run_dir: Path, labels) -> dict[str, dict[str, Any]]:
    """Each study's leaderboard (and what it was built from), by label: what the suite's
    report and the terminal table of ``attnlab compare`` show."""
    out = {}
    for label in labels:
        plan, state, bench, rows, trainings = load_run(run_dir / label)
        # the shared sweep measured every mechanism of the suite; a study ranks (and its
        # advisor weighs) its own
        rows = [r for r in rows if r["mechanism"] in plan.mechanisms]
        pass_, causal = headline_view(rows)
        lb = leaderboard(rows, trainings, pass_=pass_, causal=causal)
        for r in lb:  # the study trained its own hyperparameters, not the sweep's label's
            r["name"] = r["mechanism"] if r["model"] == "transformer" else r["name"]
        out[label] = {"plan": plan, "state": state, "bench": bench, "rows": rows,
                      "trainings": trainings, "pass": pass_, "causal": causal, "lb": lb}
    return out


def _quality_table(rep: Report, studies: dict[str, dict], names: list[str]) -> None:
    by = {label: {r["mechanism"]: r for r in s["lb"]} for label, s in studies.items()}
    cols = ["mechanism"] + [f"{label}: test {s['lb'][0]['metric']}"
                            for label, s in studies.items()]
    cells = [[n] + [_quality_cell(by[label].get(n)) if n in s["plan"].mechanisms
                    else "not in study" for label, s in studies.items()] for n in names]
    rep.table(cols, cells, caption=(
        "Test quality per study: mean ± half-width of the 95% confidence interval of the "
        "mean over seeds (Student t); against the study's best: ▲ significantly better, "
        f"▼ significantly worse, = not significantly different ({_SEPARATION_ALPHA_NOTE}), "
        f"? too few seeds for a test. {LEGEND}."))


def _speed_table(rep: Report, s: dict, names: list[str]) -> None:
    lb = {r["mechanism"]: r for r in s["lb"]}
    ns = sorted({r["N"] for r in s["rows"]})
    cols = ["mechanism"] + [f"time @ {format_length(n)}" for n in ns] + \
        [f"memory @ {format_length(ns[-1])}", "time ~ N^a"]
    cells = []
    for n in names:
        r = lb.get(n)
        if r is None:
            continue
        t = [format_time(r["time"][k]) if isinstance(r["time"].get(k), float)
             else str(r["time"].get(k, "-")) for k in ns]
        mem = r["memory"].get(ns[-1])
        mem = format_mib(mem) if isinstance(mem, (int, float)) else str(mem or "-")
        exp = "-" if r.get("time_exponent") is None else f"{r['time_exponent']:.2f}"
        cells.append([n, *t, mem, exp])
    r0 = s["rows"][0] if s["rows"] else {}
    rep.table(cols, cells, caption=(
        f"One {s['pass']} call{' (causal)' if s['causal'] else ''} at batch {r0.get('batch')}, "
        f"{r0.get('heads')} heads, head dim {r0.get('head_dim')}, {r0.get('dtype')}: median "
        f"time and peak memory above the inputs (measured); fitted exponent of time."))


def build_suite_report(run_dir: str | Path, *, out: str | Path | None = None,
                       console: Console | None = None,
                       advise: list[tuple[int, int | None]] | None = None) -> dict[str, Path]:
    """Rebuild every study's report, then write the suite's into ``out`` (default
    ``RUN_DIR/report``); returns its paths."""
    run_dir = Path(run_dir)
    console = console or Console(stderr=True)
    suite = read_suite(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    writable_dir(out, "--out" if out != run_dir / "report" else "report")
    for label in suite.studies:
        build_report(run_dir / label, console=console, advise=advise)
    studies = study_leaderboards(run_dir, suite.studies)
    names = list(suite.mechanisms)
    first = next(iter(studies.values()))
    rep = Report(f"attnlab compare: {len(names)} mechanisms, {len(studies)} studies")
    rep.section("Summary", "summary")
    train_s = sum(s["state"].get("train_s", 0.0) for s in studies.values())
    rep.paragraph(
        f"{len(names)} attention mechanisms: one benchmark sweep at N = "
        f"{', '.join(format_length(n) for n in sorted({r['N'] for r in first['rows']}))} "
        f"(both passes, causal), then {len(studies)} studies, each "
        f"{len(first['plan'].seeds)} seeds per mechanism: "
        + "; ".join(f"{k} ({s['plan'].task}, {s['plan'].train['max_steps']} steps)"
                    for k, s in studies.items()) + f". Training {train_s:.0f} s in all.")
    rep.section("Quality per study", "quality")
    _quality_table(rep, studies, names)
    for label, s in studies.items():
        for text in sections.quality_sentences(s["lb"], label):
            rep.paragraph(text)
        for m, why in s["plan"].skipped.items():
            rep.paragraph(f"{label}: not trained: {m} ({why}).")
        absent = [m for m in names if m not in s["plan"].mechanisms]
        if absent:
            rep.paragraph(f"{label}: {', '.join(absent)} not in this study (left out of the "
                          f"default for its cost; `attnlab compare --mechanisms ...` adds it).")
    rep.section("Time and memory", "speed")
    _speed_table(rep, first, names)
    n_max = max(r["N"] for r in first["rows"])
    questions = advise or [(n_max, None)]  # the longest length measured: nothing extrapolated
    for label, s in studies.items():
        sections.render_advice(rep, sections.advice(s["rows"], s["lb"], questions, s["pass"],
                                                    causal=s["causal"]),
                               title=f"Advisor, with the quality of {label}",
                               anchor=f"advisor-{label}")
    rep.section("The studies' own reports", "studies")
    rep.paragraph("Every study's report (training curves, attention maps, sparsity patterns, "
                  "every test metric, its plan): " + "; ".join(
                      f"{run_dir / k / 'report' / 'report.html'}" for k in studies) + ".")
    rep.paragraph("The suite (every setting of the sweep and the studies): "
                  f"{run_dir / 'suite.json'}; rebuild this report with "
                  f"`attnlab report {run_dir}`.")
    state = read_json(run_dir / next(iter(studies)) / "state.json", "compare state")
    rep.code(state.get("command") or "attnlab compare")
    paths = rep.write(out)
    console.print(f"report: {paths['html']}")
    return paths
