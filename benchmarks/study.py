"""What the training studies of ``benchmarks/`` share: resumable runs, in parallel worker
processes, and table cells with the seed-to-seed spread (docs/training.md).

A study script builds :class:`attnlab.train.TrainConfig` s and calls :func:`run_all`; each
run goes to its own folder, a finished one is read back and an interrupted one resumed, so
a study stopped half-way continues where it stopped. Cells are ``mean ± h``, ``h`` the
half-width of the 95 % Student-t interval of the mean over seeds (attnlab.stats): two rows
differ only where their intervals do not overlap.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from attnlab import stats
from attnlab.train.config import TrainConfig
from attnlab.train.loop import train

__all__ = ["cell", "run_all", "run_one"]


def run_one(cfg: TrainConfig, run_dir: str | Path) -> dict:
    """One run's ``summary.json`` with its ``metrics.jsonl`` rows as ``history``: trained
    now, resumed from its checkpoint, or read back when finished. A folder holding a run of
    another configuration is refused rather than mixed in."""
    d = Path(run_dir)
    if (d / "config.json").is_file():
        if json.loads((d / "config.json").read_text()) != json.loads(cfg.to_json()):
            raise SystemExit(f"{d} holds a run of another configuration (other steps, "
                             f"sizes, ...?): choose another --out")
    if not (d / "summary.json").is_file():
        train(cfg, d, progress=False, resume=(d / "checkpoint.pt").is_file())
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return {**json.loads((d / "summary.json").read_text()), "history": rows}


def run_all(runs: dict, jobs: int) -> dict:
    """``{key: (cfg, run_dir)}`` -> ``{key: run_one(cfg, run_dir)}``, ``jobs`` runs at once
    (each config's ``threads`` sets its intra-op threads: one each is fastest here)."""
    if jobs <= 1:
        return {key: run_one(cfg, d) for key, (cfg, d) in runs.items()}
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {key: pool.submit(run_one, cfg, str(d)) for key, (cfg, d) in runs.items()}
        return {key: f.result() for key, f in futures.items()}


def cell(values, digits: int = 3) -> str:
    """``mean ± h`` (95 % CI half-width over the values); the value alone for one seed."""
    ci = stats.confidence_interval(values)
    if ci.half_width is None:
        return f"{ci.mean:.{digits}f}"
    return f"{ci.mean:.{digits}f} ± {ci.half_width:.{digits}f}"
