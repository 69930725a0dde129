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

from attnlab.bench.store import Store
from attnlab.compare.plan import read_plan
from attnlab.files import read_json, readable_file, writable_dir
from attnlab.report.document import Report
from attnlab.train.checkpoint import check_checkpoint_file
from attnlab.train.config import read_run_config

__all__ = ["build_report", "DEFAULT_BUDGET"]

DEFAULT_BUDGET = 2**30  # the advisor's second question: what fits in 1 GiB at 4x the data


def _load(run_dir: Path) -> tuple[Any, dict, dict, list[dict], list[dict]]:
    for name in ("plan.json", "state.json", "results.db"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"RUN_DIR: {run_dir} is not a compare run directory "
                                    f"({name} is missing); create one with `attnlab compare`")
    plan = read_plan(run_dir / "plan.json")
    state = read_json(run_dir / "state.json", "compare state")
    # SQLite says only "unable to open database file" of a file it may not read
    readable_file(run_dir / "results.db", "results database")
    with Store(run_dir / "results.db", readonly=True) as store:
        if state.get("bench_run") is None:
            raise FileNotFoundError(f"RUN_DIR: {run_dir} has no finished benchmark yet; "
                                    f"run the compare command again to resume it")
        bench = store.run(state["bench_run"])
        rows = store.measurements(state["bench_run"])
        trainings = store.trainings(plan.task)
    # The database stores absolute paths; a run directory copied elsewhere still holds its
    # seeds at train/<mechanism>/seed-<s>, so that is where they are looked for.
    from attnlab.compare.run import run_dir_of
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
    from attnlab.bench.analysis import format_length, format_time
    from attnlab.report.leaderboard import quality_text
    from attnlab.tasks.base import get_task
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
        best = trained[0]
        stds = [r["test_std"] for r in trained if r.get("test_std") is not None]
        spread = abs(trained[0]["test_mean"] - trained[-1]["test_mean"])
        rep.paragraph(f"Best test {best['metric']}: {best['name']} at {quality_text(best)} (mean ± "
                      f"sample std over {best['n_seeds']} seeds). Best to worst spans "
                      f"{spread:.3g}" + (f"; the median seed-to-seed std is "
                                         f"{sorted(stds)[len(stds) // 2]:.2g}, so closer "
                                         f"rankings than a few of those are noise"
                                         if stds else "") + ".")
    n_max = max(ns)
    timed = [(r["time"][n_max], r["name"]) for r in lb
             if isinstance(r["time"].get(n_max), float)]
    if timed:
        t, name = min(timed)
        rep.paragraph(f"Fastest at N={format_length(n_max)} ({pass_}): {name}, "
                      f"{format_time(t)} per call.")
    if advice:
        a = advice[-1]
        within = "" if a.memory_budget_bytes is None else \
            f" within {a.memory_budget_bytes / 2**20:.0f} MiB"
        rep.paragraph(f"The advisor's pick at N={format_length(a.n)}{within}: "
                      f"{a.recommended or 'none fits'} (see the Advisor section for the "
                      f"reasoning).")
    bad = sorted({(r["label"], r["status"]) for r in rows if r["status"] != "ok"})
    if bad:
        rep.paragraph("Benchmark points that did not run: " + "; ".join(
            f"{lab} {st}" for lab, st in bad) + ".")
    for m, why in plan.skipped.items():
        rep.paragraph(f"Not trained: {m} ({why}).")


def _leaderboard(rep: Report, lb, rows, pass_, bench, trainings) -> None:
    from attnlab.report.leaderboard import BASELINE, render_leaderboard
    rep.section("Leaderboard", "leaderboard")
    cols, cells = render_leaderboard(lb, sorted({r["N"] for r in rows}))
    r0 = next(iter(rows), {})
    unit = trainings[0]["summary"]["throughput_unit"] if trainings else "units/s"
    rep.table(cols, cells, caption=(
        f"test metric: mean ± sample standard deviation over seeds, best validation weights; "
        f"conv. step/time: first evaluation within 95% of the run's best validation score; "
        f"throughput: training {unit}; time and memory: one "
        f"{pass_} call at batch {r0.get('batch')}, {r0.get('heads')} heads, head dim "
        f"{r0.get('head_dim')}, {r0.get('dtype')} (peak memory above the inputs); roof: "
        f"achieved fraction of this machine's matmul peak "
        f"({bench['machine'].get('roof_gflops', float('nan')):.0f} GFLOP/s) at the largest "
        f"length; crossover: the length above which the mechanism is faster than {BASELINE}."))


def _test_metrics(rep: Report, lb, trainings) -> None:
    """Every scalar test metric (accuracy and macro-F1, PSNR and SSIM, perplexity, ...) as
    mean ± sample std over the seeds, in the leaderboard's order."""
    from attnlab.train.runs import aggregate
    by: dict[str, list[dict]] = {}
    for t in trainings:
        by.setdefault(t["mechanism"], []).append(t["summary"])
    tests = {m: aggregate(ss)["test"] for m, ss in by.items()}
    keys = sorted({k for agg in tests.values() for k, v in agg.items() if v and k != "n"})
    if not keys:
        return
    rows, seen = [], set()
    for r in lb:
        agg = tests.get(r["mechanism"]) if r["model"] == "transformer" else None
        if not agg or r["mechanism"] in seen:
            continue
        seen.add(r["mechanism"])
        cells = []
        for k in keys:
            ms = agg.get(k)
            cells.append("-" if not ms else f"{ms['mean']:.4g}" + (
                f" ± {ms['std']:.2g}" if ms["n"] > 1 else ""))
        rows.append([r["mechanism"], *cells])
    rep.table(["mechanism", *keys], rows, caption="Every test metric: mean ± sample standard "
                                                  "deviation over seeds.")


def _training(rep: Report, figs: Path, plan, dirs, lb) -> None:
    from attnlab.report.training_plots import plot_loss_curves, plot_pareto, read_curves
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
    from attnlab.bench.plots import plot_run
    from attnlab.report.leaderboard import BASELINE
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
    from attnlab.report import sections
    from attnlab.report.leaderboard import leaderboard
    run_dir = Path(run_dir)
    console = console or Console(stderr=True)
    plan, state, bench, rows, trainings = _load(run_dir)
    what = "--out" if out is not None else "report"
    out = Path(out) if out is not None else run_dir / "report"
    figs = out / "figures"
    for d in (out, figs):  # before any figure: a read-only destination is said at once
        writable_dir(d, what)
    passes = {r["pass_"] for r in rows if r["status"] == "ok"}
    pass_ = "fwd+bwd" if "fwd+bwd" in passes else "fwd"
    lb = leaderboard(rows, trainings, pass_=pass_)
    dirs = _seed_dirs(plan, trainings)
    _check_runs(dirs)
    n_max = max((r["N"] for r in rows), default=1024)
    questions = advise or [(n_max, None), (4 * n_max, DEFAULT_BUDGET)]
    advice = sections.advice(rows, lb, questions, pass_)

    rep = Report(f"attnlab compare: {len(plan.mechanisms)} mechanisms on {plan.task}")
    console.print(f"report: {len(rows)} measurements, {len(trainings)} training runs")
    _summary(rep, plan, state, bench, rows, lb, advice, pass_)
    _leaderboard(rep, lb, rows, pass_, bench, trainings)
    _test_metrics(rep, lb, trainings)
    _training(rep, figs, plan, dirs, lb)
    _scaling(rep, figs, rows, bench, pass_)
    # attention maps and inpainting images use the same trained models: load each once
    from attnlab.train.loop import load_trained
    load = functools.cache(load_trained)
    sections.attention(rep, figs, plan, dirs, console, load=load)
    sections.patterns(rep, figs, plan)
    sections.inpainting(rep, figs, plan, dirs, load=load)
    sections.render_advice(rep, advice)
    sections.reproduce(rep, run_dir, plan, state, bench, trainings)
    paths = rep.write(out)
    console.print(f"report: {paths['html']}")
    return {**paths, "figures": figs}
