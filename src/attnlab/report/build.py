"""The report of a compare run, rebuilt from what it stored: ``attnlab report RUN_DIR``.

Inputs, all under ``RUN_DIR`` (see :mod:`attnlab.compare.run`): ``plan.json``,
``state.json``, ``results.db`` (benchmark measurements and training rows) and the training
runs' ``metrics.jsonl`` and ``best.pt``. Nothing is recomputed from memory, so a report
rebuilt later shows the same numbers. Output: ``RUN_DIR/report/report.html`` (one
self-contained file: inline SVG figures, no script, no URL), ``report.md`` and
``figures/*.png`` (+ ``.svg``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from rich.console import Console

from attnlab.bench.analysis import format_length, format_time
from attnlab.bench.plots import plot_run
from attnlab.bench.store import Store
from attnlab.compare.plan import read_plan
from attnlab.compare.run import run_dir_of
from attnlab.files import read_json, readable_file, writable_dir
from attnlab.report import sections
from attnlab.report.advisor import answers
from attnlab.report.document import Report
from attnlab.report.leaderboard import (
    BASELINE,
    LEGEND,
    headline_view,
    leaderboard,
    render_leaderboard,
)
from attnlab.report.sections import quality_sentences
from attnlab.report.training_plots import plot_loss_curves, plot_pareto, read_curves
from attnlab.train.checkpoint import check_checkpoint_file
from attnlab.train.config import read_run_config
from attnlab.train.loop import load_trained
from attnlab.train.task import get_task
from attnlab.util.fmt import format_mib

__all__ = ["build_report", "load_run", "DEFAULT_BUDGET"]

DEFAULT_BUDGET = 2**30  # the advisor's second question: what fits in 1 GiB at 4x the data


def load_run(run_dir: Path) -> tuple[Any, dict, dict, list[dict], list[dict]]:
    """``(plan, state, bench run, measurements, trainings)`` of the compare in ``run_dir``."""
    for name in ("plan.json", "state.json", "results.db"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"RUN_DIR: {run_dir} is not a compare run directory "
                                    f"({name} is missing); create one with `attnlab compare`")
    plan = read_plan(run_dir / "plan.json")
    state = read_json(run_dir / "state.json", "compare state")
    if state.get("bench_run") is None:
        raise FileNotFoundError(f"RUN_DIR: {run_dir} has no finished benchmark yet; "
                                f"run the compare command again to resume it")
    # A study of a suite reads the suite's sweep; its own database holds its trainings.
    bench_db = run_dir / plan.bench_dir / "results.db" if plan.bench_dir else \
        run_dir / "results.db"
    for db in {bench_db, run_dir / "results.db"}:
        # SQLite says only "unable to open database file" of a file it may not read
        readable_file(db, "results database")
    with Store(bench_db, readonly=True) as store:
        bench = store.run(state["bench_run"])
        rows = store.measurements(state["bench_run"])
    with Store(run_dir / "results.db", readonly=True) as store:
        trainings = store.trainings(plan.task)
    # The database stores absolute paths; a run directory copied elsewhere still holds its
    # seeds at train/<mechanism>/seed-<s>, so that is where they are looked for.
    for t in trainings:
        t["run_dir"] = str(run_dir_of(run_dir, t["mechanism"], t["seed"]))
    trainings = [t for t in trainings if t["mechanism"] in plan.mechanisms
                 and Path(t["run_dir"]).is_dir()]
    return plan, state, bench, rows, trainings


def _check_runs(dirs: dict[str, list[Path]]) -> None:
    """Every stored run the report draws from is whole (its config.json readable and valid,
    its best.pt not empty or cut short): a broken file fails the report here, naming it,
    before any figure is drawn, rather than as a gap in the report or minutes later."""
    for ds in dirs.values():
        for d in ds:
            read_run_config(d)
            check_checkpoint_file(d / "best.pt")


def _seed_dirs(plan, trainings: list[dict]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for m in plan.trained():
        ds = sorted(Path(t["run_dir"]) for t in trainings if t["mechanism"] == m)
        if ds:
            out[m] = ds
    return out


def _summary(rep: Report, plan, state, bench, rows, lb, advice, pass_) -> None:
    cls = get_task(plan.task)
    rep.section("Summary", "summary")
    ns = sorted({r["N"] for r in rows})
    trained = [r for r in lb if r.get("test_mean") is not None]
    rep.paragraph(
        f"{len(plan.mechanisms)} attention mechanisms compared on {plan.task} ({cls.summary}): "
        f"a benchmark sweep at N = {', '.join(format_length(n) for n in ns)} "
        f"({', '.join(sorted({r['pass_'] for r in rows}))}), then "
        f"{plan.train.get('max_steps', cls.defaults.get('max_steps'))} training steps x "
        f"{len(plan.seeds)} seeds per mechanism. Benchmark {state.get('bench_s', 0):.0f} s, "
        f"training {state.get('train_s', 0):.0f} s (profile {plan.profile}).")
    if trained:
        rep.paragraph(" ".join(quality_sentences(lb, plan.task)))
    n_max = max(ns)
    timed = [(r["time"][n_max], r["name"]) for r in lb
             if isinstance(r["time"].get(n_max), float)]
    if timed:
        t, name = min(timed)
        rep.paragraph(f"Fastest at N={format_length(n_max)} ({pass_}): {name}, "
                      f"{format_time(t)} per call (measured).")
    if advice:
        a = advice[-1]
        within = "" if a.memory_budget_bytes is None else \
            f" within {format_mib(a.memory_budget_bytes, 0)}"
        pick = dict(answers(a))["Recommended"] if a.recommended else "none fits"
        rep.paragraph(f"The advisor's pick at N={format_length(a.n)}{within}: {pick} (see "
                      f"the Advisor section for the reasoning).")
    bad = sorted({(r["label"], r["status"]) for r in rows if r["status"] != "ok"})
    if bad:
        rep.paragraph("Benchmark points that did not run: " + "; ".join(
            f"{lab} {st}" for lab, st in bad) + ".")
    for m, why in plan.skipped.items():
        rep.paragraph(f"Not trained: {m} ({why}).")


def _leaderboard(rep: Report, lb, rows, pass_, bench, trainings) -> None:
    rep.section("Leaderboard", "leaderboard")
    cols, cells = render_leaderboard(lb, sorted({r["N"] for r in rows}))
    r0 = next(iter(rows), {})
    unit = trainings[0]["summary"]["throughput_unit"] if trainings else "units/s"
    rep.table(cols, cells, caption=(
        f"test metric: mean ± half-width of the 95% confidence interval of the mean over "
        f"seeds (Student t; one seed has none), best validation weights; {LEGEND}; "
        f"conv. step/time: first evaluation within 95% of the run's best validation score "
        f"(mean over seeds); throughput: training {unit} (mean over seeds); time and memory: "
        f"one "
        f"{pass_} call at batch {r0.get('batch')}, {r0.get('heads')} heads, head dim "
        f"{r0.get('head_dim')}, {r0.get('dtype')} (peak memory above the inputs); roof: "
        f"achieved fraction of this machine's matmul peak "
        f"({bench['machine'].get('roof_gflops', float('nan')):.0f} GFLOP/s) at the largest "
        f"length; crossover: the length above which the mechanism is faster than {BASELINE}."))


def _training(rep: Report, figs: Path, plan, dirs, lb) -> None:
    rep.section("Training curves", "training")
    if not dirs:
        rep.paragraph("No finished training runs.")
        return
    curves = {m: [read_curves(d) for d in ds] for m, ds in dirs.items()}
    png, svg, ppng, psvg = plot_loss_curves(curves, figs / "loss_curves")
    rep.figure(svg, png, caption="Training loss of every mechanism: mean over seeds, "
                                 "min-max band over seeds.")
    rep.figure(psvg, ppng, caption="Per mechanism: training loss (left axis) and the "
                                   "validation metric (right axis).")
    pts = [{"name": r["name"], "throughput": r["throughput"], "test_mean": r["test_mean"]}
           for r in lb if r.get("test_mean") is not None and r.get("throughput")]
    if len(pts) >= 2:
        png, svg = plot_pareto(pts, figs / "pareto_quality_throughput",
                               mode=lb[0].get("mode") or "max")
        rep.figure(svg, png, caption=f"Test {lb[0]['metric']} against training throughput "
                                     f"({plan.task}); the red line joins the mechanisms no "
                                     f"other beats on both.")


def _scaling(rep: Report, figs: Path, rows, bench, pass_) -> None:
    rep.section("Time and memory vs sequence length", "scaling")
    paths = plot_run(rows, bench, figs / "bench")
    for kind, what in (("time_vs_n", "Time per call"), ("memory_vs_n", "Peak memory"),
                       ("speedup_vs_n", f"Speed-up over {BASELINE}")):
        for svg in sorted(p for p in paths if p.suffix == ".svg"
                          and p.name.startswith(f"{kind}-{pass_}-")):
            rep.figure(svg, svg.with_suffix(".png"), caption=(
                f"{what} against N (log-log), {pass_} pass; the legend gives each fitted "
                f"exponent a in N^a."))
    rep.paragraph(f"Exponents and crossover lengths against {BASELINE} are columns of the "
                  f"leaderboard; a point that did not run shows its status there.")


def build_report(run_dir: str | Path, *, out: str | Path | None = None,
                 console: Console | None = None,
                 advise: list[tuple[int, int | None]] | None = None) -> dict[str, Path]:
    """Write the report of the compare in ``run_dir``; returns its paths (html, markdown,
    figures). ``advise``: the advisor's questions ``(N, memory budget bytes or None)``;
    default: the longest measured N without a budget, and 4x it within 1 GiB."""
    run_dir = Path(run_dir)
    console = console or Console(stderr=True)
    plan, state, bench, rows, trainings = load_run(run_dir)
    what = "--out" if out is not None else "report"
    out = Path(out) if out is not None else run_dir / "report"
    figs = out / "figures"
    for d in (out, figs):  # before any figure: a read-only destination is said at once
        writable_dir(d, what)
    pass_, causal = headline_view(rows)
    lb = leaderboard(rows, trainings, pass_=pass_, causal=causal)
    dirs = _seed_dirs(plan, trainings)
    _check_runs(dirs)
    n_max = max((r["N"] for r in rows), default=1024)
    questions = advise or [(n_max, None), (4 * n_max, DEFAULT_BUDGET)]
    advice = sections.advice(rows, lb, questions, pass_, causal=causal)

    rep = Report(f"attnlab compare: {len(plan.mechanisms)} mechanisms on {plan.task}")
    console.print(f"report: {len(rows)} measurements, {len(trainings)} training runs")
    _summary(rep, plan, state, bench, rows, lb, advice, pass_)
    _leaderboard(rep, lb, rows, pass_, bench, trainings)
    sections.all_test_metrics(rep, lb, trainings)
    _training(rep, figs, plan, dirs, lb)
    _scaling(rep, figs, rows, bench, pass_)
    # attention maps and inpainting images use the same trained models: load each once
    load = functools.cache(load_trained)
    sections.attention(rep, figs, plan, dirs, console, load=load)
    sections.patterns(rep, figs, plan)
    sections.inpainting(rep, figs, plan, dirs, load=load)
    sections.render_advice(rep, advice)
    sections.reproduce(rep, run_dir, plan, state, bench, trainings)
    paths = rep.write(out)
    console.print(f"report: {paths['html']}")
    return {**paths, "figures": figs}
