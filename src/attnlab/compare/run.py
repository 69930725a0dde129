"""Run a :class:`~attnlab.compare.plan.Plan` into one directory, resumably.

``RUN_DIR/`` holds ``plan.json`` (what runs), ``state.json`` (the command, the benchmark
run's id, timings), ``results.db`` (the benchmark lab's SQLite store: the sweep's
measurements and one ``trainings`` row per finished seed), ``train/<mechanism>/seed-<s>/``
(ordinary training runs: metrics, checkpoints, summary); ``attnlab compare`` then writes
``report/`` from them (:mod:`attnlab.report`, above this package: nothing here imports
it). A study of a
suite (:mod:`attnlab.compare.suite`) keeps its trainings there too, and reads the suite's
one sweep from ``plan.bench_dir``.

Order: the benchmark sweep first, alone on the machine (timings measured next to training
processes would be slowed by them); then the training runs, ``jobs`` at a time in separate
processes of one thread each (small models do not use two threads well, two runs do).
Interrupting (Ctrl-C / SIGTERM) stops the sweep at a point boundary and
each training run at a step boundary with a checkpoint; the same command resumes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from rich.console import Console

from attnlab.bench.grid import make_grid
from attnlab.bench.runner import run_sweep
from attnlab.bench.store import Store
from attnlab.compare.plan import Plan, load_or_save
from attnlab.files import read_json, writable_database, writable_dir, write_json
from attnlab.train.config import TrainConfig, read_run_config
from attnlab.train.loop import train
from attnlab.train.runs import record
from attnlab.util.progress import make_progress

__all__ = ["bench_sweep", "run_compare", "run_dir_of", "CompareInterrupted"]


class CompareInterrupted(KeyboardInterrupt):
    """The compare stopped early; what finished is stored and the same command resumes."""


def _raise_interrupt(signum, frame):
    raise CompareInterrupted(f"signal {signum}")


def run_dir_of(run_dir: Path, mechanism: str, seed: int) -> Path:
    return Path(run_dir) / "train" / mechanism / f"seed-{seed}"


def _state(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "state.json"
    return read_json(p, "compare state") if p.exists() else {}


def _save_state(run_dir: Path, state: dict[str, Any]) -> None:
    write_json(run_dir / "state.json", state, sort_keys=True)  # atomic: never half a file


def _check_outputs(run_dir: Path) -> None:
    """Before the plan, the state or the benchmark: the run directory takes files, and its
    results database (if there is one) can be read, written and is whole."""
    writable_dir(run_dir, "--out")
    db = run_dir / "results.db"
    if db.exists():
        writable_database(db, "--out")
        with Store(db):  # opening it checks it (a corrupt or foreign file is refused)
            pass


def _train_one(cfg: dict, run_dir: str) -> dict[str, Any]:
    """One seed of one mechanism (in a worker process, or in-process with jobs=1)."""
    d = Path(run_dir)
    res = train(TrainConfig.from_dict(cfg), d, resume=(d / "checkpoint.pt").exists(),
                progress=False)
    return {"status": res.status, "summary": res.summary}


def bench_sweep(settings: dict, run_dir: Path, command: str, progress: bool,
                console: Console) -> int:
    """The benchmark sweep of ``settings`` (make_grid's) in ``run_dir/results.db``; its run
    id. A finished sweep of this very grid is kept; an unfinished one is resumed by
    run_sweep itself (same grid digest, same machine)."""

    settings = dict(settings)
    grid = make_grid(profile=settings.pop("profile", None), where="compare", **settings)
    with Store(run_dir / "results.db") as store:
        done = [r["id"] for r in store.runs()
                if r["grid_digest"] == grid.digest() and r["status"] == "done"]
        if done:
            console.print(f"benchmark: run {done[-1]} already finished, kept")
            return done[-1]
        console.print(f"[bold]benchmark[/bold]: {len(grid.points())} points "
                      f"({len(grid.mechanisms)} mechanisms x N={list(grid.lengths)})")
        return run_sweep(grid, store, command=command, resume=True, progress=progress,
                         console=console)


def _bench(plan: Plan, run_dir: Path, state: dict, command: str, progress: bool,
           console: Console) -> None:
    t0 = time.perf_counter()
    try:
        state["bench_run"] = bench_sweep(plan.bench, run_dir, command, progress, console)
    finally:
        state["bench_s"] = state.get("bench_s", 0.0) + time.perf_counter() - t0
        _save_state(run_dir, state)


def _record_missing(plan: Plan, run_dir: Path, db: Path) -> None:
    """Every finished seed is one ``trainings`` row (also after an interrupt that fell
    between a run's end and its row)."""
    with Store(db) as store:
        have = {r["run_dir"] for r in store.trainings(plan.task)}
    for m in plan.trained():
        for s in plan.seeds:
            d = run_dir_of(run_dir, m, s)
            if (d / "summary.json").exists() and str(d.resolve()) not in have:
                record(db, d, read_run_config(d), read_json(d / "summary.json", "run summary"))


def _longest_first(todo: list[tuple[str, int]], plan: Plan, db: Path,
                   bench_run: int | None) -> list[tuple[str, int]]:
    """``todo`` with the slowest mechanisms first, by the sweep's own forward+backward time
    at the length nearest the task's: with ``jobs`` workers the last run then runs beside
    others rather than alone (longest-processing-time-first scheduling). Order only: what
    each run computes does not change. Without a usable sweep the order is kept."""
    if bench_run is None or not db.exists():
        return todo
    opts = plan.train.get("task_kwargs", {})
    length = next((opts[k] for k in ("length", "max_len", "seq_len") if k in opts), None)
    with Store(db, readonly=True) as store:
        rows = [r for r in store.measurements(bench_run)
                if r["status"] == "ok" and r["pass_"] == "fwd+bwd"]
    if not rows:
        return todo
    ns = sorted({r["N"] for r in rows})
    n = min(ns, key=lambda x: abs(x - length)) if isinstance(length, int) else ns[0]
    cost = {r["mechanism"]: r["time_s"] for r in rows if r["N"] == n}
    return sorted(todo, key=lambda ms: -cost.get(ms[0], 0.0))


def _training(plan: Plan, run_dir: Path, jobs: int, progress: bool,
              console: Console, bench: tuple[Path, int | None] | None = None) -> None:
    db = run_dir / "results.db"
    _record_missing(plan, run_dir, db)
    todo = [(m, s) for m in plan.trained() for s in plan.seeds
            if not (run_dir_of(run_dir, m, s) / "summary.json").exists()]
    if jobs > 1 and bench is not None:
        todo = _longest_first(todo, plan, *bench)
    total = len(plan.trained()) * len(plan.seeds)
    for m, why in plan.skipped.items():
        console.print(f"[yellow]not trained[/yellow]: {m}: {why}")
    if not todo:
        console.print(f"training: all {total} runs already finished, kept")
        return
    jobs = max(1, min(jobs, len(todo)))
    console.print(f"[bold]training[/bold]: {len(todo)} of {total} runs on {plan.task} "
                  f"({plan.train.get('max_steps')} steps), {jobs} at a time")
    with make_progress("training", trailing="{task.description}", console=console,
                       enabled=progress) as bar:
        tid = bar.add_task("", total=total, completed=total - len(todo))

        def finished(m: str, s: int, res: dict) -> None:
            if res["status"] == "interrupted":
                raise CompareInterrupted(f"{m} seed {s} interrupted")
            record(db, run_dir_of(run_dir, m, s), plan.config(m, s), res["summary"])
            test = res["summary"]["test"][res["summary"]["metric"]]
            bar.console.print(f"  {m} seed {s}: test {res['summary']['metric']} {test:.4f}, "
                              f"{res['summary']['train_time_s']:.0f} s")
            bar.advance(tid)

        if jobs == 1:
            for m, s in todo:
                bar.update(tid, description=f"{m} seed {s}")
                finished(m, s, _train_one(plan.config(m, s).to_dict(),
                                          str(run_dir_of(run_dir, m, s))))
            return
        _pool(plan, run_dir, todo, jobs, bar, tid, finished)


def _pool(plan, run_dir, todo, jobs, bar, tid, finished) -> None:
    # spawn, not fork: a forked child would inherit torch's thread pools and locks.
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)
    running: dict = {}
    queue = list(todo)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                m, s = queue.pop(0)
                fut = pool.submit(_train_one, plan.config(m, s).to_dict(),
                                  str(run_dir_of(run_dir, m, s)))
                running[fut] = (m, s)
            bar.update(tid, description=", ".join(f"{m} s{s}" for m, s in running.values()))
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                m, s = running.pop(fut)
                finished(m, s, fut.result())
    except (KeyboardInterrupt, BrokenProcessPool) as e:
        # Ctrl-C reached the workers too (one process group; a second one would stop them
        # without a checkpoint). SIGTERM reached only this process: pass it on, so that
        # each running seed checkpoints at its next step and returns.
        forward = isinstance(e, CompareInterrupted)
        for proc in list(getattr(pool, "_processes", {}).values()) if forward else []:
            try:
                os.kill(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        pool.shutdown(wait=True, cancel_futures=True)
        raise CompareInterrupted(str(e) or "interrupted") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_compare(plan: Plan, run_dir: str | Path, *, jobs: int | None = None,
                progress: bool = True, console: Console | None = None, command: str = "",
                bench_run: int | None = None) -> dict[str, Any]:
    """Run (or resume) ``plan`` in ``run_dir``: the sweep, then the trainings; returns the
    state (``state.json``). The report is built from the directory afterwards
    (``attnlab report RUN_DIR``, :func:`attnlab.report.build.build_report`). A study of
    a suite (``plan.bench_dir``) runs no sweep of its own: ``bench_run`` is the suite's, in
    ``run_dir / plan.bench_dir / "results.db"``. Raises :class:`CompareInterrupted` when
    stopped early (rerun to resume)."""
    run_dir = Path(run_dir)
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs: expected an integer >= 1 (training runs at a time); "
                         f"got {jobs!r}")
    console = console or Console(stderr=True, quiet=not progress)
    _check_outputs(run_dir)
    resumed = load_or_save(plan, run_dir)
    state = _state(run_dir)
    if not resumed or "command" not in state:
        state.update(command=command, started_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    state["resumed"] = state.get("resumed", 0) + int(resumed)
    _save_state(run_dir, state)
    if resumed:
        console.print(f"resuming the comparison in {run_dir}")
    if plan.bench_dir:
        if bench_run is None:
            raise ValueError(f"plan {plan.label!r} uses the sweep of {plan.bench_dir}: pass "
                             f"its bench_run")
        state["bench_run"] = bench_run
        _save_state(run_dir, state)
    else:
        _bench(plan, run_dir, state, command, progress, console)
    t0 = time.perf_counter()
    # SIGTERM (a scheduler's stop) ends like Ctrl-C: running seeds checkpoint, state is saved.
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        bench_db = (run_dir / plan.bench_dir if plan.bench_dir else run_dir) / "results.db"
        _training(plan, run_dir, jobs or os.cpu_count() or 1, progress, console,
                  (bench_db, state.get("bench_run")))
    finally:
        signal.signal(signal.SIGTERM, old)
        state["train_s"] = state.get("train_s", 0.0) + time.perf_counter() - t0
        _save_state(run_dir, state)
    state["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _save_state(run_dir, state)
    return state
