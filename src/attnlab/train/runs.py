"""Several seeds of one configuration: one run directory each, one summary for all.

``run_dir/seed-<s>/`` is an ordinary run (see :mod:`attnlab.train.loop`);
``run_dir/summary.json`` gathers the seeds: mean and sample standard deviation (0 for a
single seed; :mod:`attnlab.stats`) of the test metrics, best validation score, training
time, throughput and convergence. Each finished seed is also a row of the results
database's ``trainings`` table when a database is given (a seed kept by ``--resume`` too,
when its row is missing: a resumed run's database ends as an uninterrupted run's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from attnlab.bench.machine import describe, git_commit, versions
from attnlab.bench.store import Store
from attnlab.files import read_json, writable_database, writable_dir, write_json
from attnlab.train.config import TrainConfig
from attnlab.train.loop import train
from attnlab.train.metrics import mean_std

__all__ = ["train_seeds", "aggregate", "record", "record_if_missing"]


def _mean_std(values: list[float]) -> dict[str, float] | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    mean, std = mean_std(values)  # one seed: std 0; summary.json's readers check "n"
    return {"mean": mean, "std": std, "n": len(values)}


def aggregate(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of every scalar test metric and of the run figures."""
    first = summaries[0]
    test_keys = [k for k, v in first["test"].items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
    conv = [s.get("convergence") or {} for s in summaries]
    return {
        "task": first["task"], "model": first["model"], "mechanism": first["mechanism"],
        "metric": first["metric"], "mode": first["mode"], "parameters": first["parameters"],
        "seeds": [s["seed"] for s in summaries],
        "test": {k: _mean_std([s["test"].get(k) for s in summaries]) for k in test_keys},
        "best_validation": _mean_std([s["best_validation"][first["metric"]]
                                      for s in summaries]),
        "train_time_s": _mean_std([s["train_time_s"] for s in summaries]),
        "throughput": _mean_std([s["throughput"] for s in summaries]),
        "throughput_unit": first["throughput_unit"],
        "steps": _mean_std([s["steps"] for s in summaries]),
        "convergence_step": _mean_std([c.get("step") for c in conv]),
        "convergence_time_s": _mean_std([c.get("time") for c in conv]),
        "statuses": [s["status"] for s in summaries],
    }


def record(db: str | Path, run_dir: Path, cfg: TrainConfig, summary: dict[str, Any]) -> None:
    """One row of the results database's ``trainings`` table for a finished seed."""
    with Store(db) as store:
        store.add_training({
            "run_dir": str(Path(run_dir).resolve()), "task": cfg.task, "model": cfg.model,
            "mechanism": cfg.mechanism, "seed": cfg.seed, "status": summary["status"],
            "steps": summary["steps"], "train_time_s": summary["train_time_s"],
            "throughput": summary["throughput"], "metric": summary["metric"],
            "mode": summary["mode"],
            "best_validation": summary["best_validation"][summary["metric"]],
            "test_value": summary["test"][summary["metric"]],
            "parameters": summary["parameters"], "summary": summary, "config": cfg.to_dict(),
            "versions": versions(), "machine": describe(cfg.device), "git_commit": git_commit(),
        })


def record_if_missing(db: str | Path, run_dir: Path, cfg: TrainConfig,
                      summary: dict[str, Any]) -> bool:
    """:func:`record` a finished seed unless the database holds this very row already (same
    run directory and summary); True if it recorded. A row that is there keeps the
    machine, versions and time of the training that produced it."""
    key = str(Path(run_dir).resolve())
    with Store(db) as store:
        rows = [r for r in store.trainings(cfg.task) if r["run_dir"] == key]
    if rows and rows[0]["summary"] == summary:
        return False
    record(db, run_dir, cfg, summary)
    return True


def check_outputs(run_dir: Path, db: str | Path | None) -> None:
    """Refuse, before the first step, a run directory or a database that cannot take the
    results (read-only, unreadable, corrupt, not attnlab's), instead of failing when the
    first seed has finished."""
    writable_dir(run_dir, "--run-dir")
    if db is not None:
        writable_database(db, "--db")
        with Store(db):  # opening it checks (and creates) it
            pass


def _kept(one: TrainConfig, d: Path, db, console: Console) -> dict[str, Any]:
    """The summary of a seed that ``--resume`` keeps (it finished before)."""
    if read_json(d / "config.json", "run config") != one.to_dict():
        raise ValueError(f"--resume: {d} was trained with another configuration "
                         f"(its config.json differs)")
    summary = read_json(d / "summary.json", "run summary")
    # Its row may be missing: the process was stopped between the summary and the row,
    # or the run was started without --db.
    if db is not None and record_if_missing(db, d, one, summary):
        console.print(f"seed {one.seed}: already finished, kept (recorded in {db})")
    else:
        console.print(f"seed {one.seed}: already finished, kept")
    return summary


def train_seeds(cfg: TrainConfig, seeds: list[int], run_dir: str | Path, *,
                resume: bool = False, db: str | Path | None = None, progress: bool = True,
                console: Console | None = None) -> dict[str, Any] | None:
    """Train ``cfg`` once per seed; returns the aggregate summary (None if interrupted).

    With ``resume``, finished seeds are kept, an interrupted one continues from its
    checkpoint and missing ones start."""
    run_dir = Path(run_dir)
    console = console or Console(stderr=True, quiet=not progress)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one; got {seeds!r}")
    check_outputs(run_dir, db)
    summaries = []
    for seed in seeds:
        one = cfg.replace(seed=seed)
        d = run_dir / f"seed-{seed}"
        if resume and (d / "summary.json").exists():
            summaries.append(_kept(one, d, db, console))
            continue
        result = train(one, d, resume=resume and (d / "checkpoint.pt").exists(),
                       progress=progress, console=console)
        if result.status == "interrupted":
            return None
        summaries.append(result.summary)
        if db is not None:
            record(db, d, one, result.summary)
    agg = aggregate(summaries)
    write_json(run_dir / "summary.json", agg, default=float)
    return agg
