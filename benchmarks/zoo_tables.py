"""The tables of docs/zoo.md: the mechanisms that take graph or pair inputs (and the
models around them) on their own tasks, 3 seeds each, from ``attnlab train`` runs.

    python benchmarks/zoo_tables.py RUNS_DIR            # trains what is missing, prints
    python benchmarks/zoo_tables.py RUNS_DIR --imdb-dir DIR   # and the IMDB (HAN) table

The IMDB rows need the original files (``aclImdb`` or its CSV, see ``attnlab.data.text``)
and run only when ``--imdb-dir`` names them.

Each row is one ``attnlab train`` command (in a child process, so that its peak RSS is
the run's own), its seeds' test metric as mean ± the 95% confidence interval (Student t,
:mod:`attnlab.stats`), the training time per step (mean over seeds) and the process's
peak RSS. A run directory that already holds a seed's ``summary.json`` is not trained
again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from attnlab.stats import confidence_interval

SEEDS = ("0", "1", "2")
_SHORT = ["--max-steps", "600"]

# (table, row label, task, attnlab train arguments)
ROWS = [
    ("graph", "gat (edge list)", "sbm", ["--mechanism", "gat"]),
    ("graph", "graph_dot (edge list)", "sbm", ["--mechanism", "graph_dot"]),
    ("graph", "gat, masked dense reference", "sbm", ["--mechanism", "gat", "--model",
                                                     "gat_dense"]),
    ("graph", "gat on karate club", "karate", ["--mechanism", "gat"]),
    ("pair", "co_attention_parallel", "fact_lookup",
     ["--model-opt", "pairing=co_attention_parallel"]),
    ("pair", "co_attention_alternating", "fact_lookup",
     ["--model-opt", "pairing=co_attention_alternating"]),
    ("pair", "cross-attention (sdpa)", "fact_lookup", ["--model-opt", "pairing=cross"]),
    # 600 of the task's 2000 steps: the table compares the cross-attentions at one budget
    ("seq2seq", "cross sdpa", "seq2seq", _SHORT),
    ("seq2seq", "cross luong_monotonic", "seq2seq",
     ["--model-opt", "cross_mechanism=luong_monotonic", *_SHORT]),
    ("seq2seq", "cross luong_predictive", "seq2seq",
     ["--model-opt", "cross_mechanism=luong_predictive", *_SHORT]),
]
# HAN against the flat encoder classifier at one budget (1000 of the task's 3000 steps)
_IMDB = ["--max-steps", "1000"]
IMDB_ROWS = [
    ("imdb", "HAN (word + sentence attention)", "imdb", ["--model", "han", *_IMDB]),
    ("imdb", "transformer, sdpa (512 tokens)", "imdb", _IMDB),
]


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def run_row(runs: Path, table: str, label: str, task: str, args: list[str]) -> dict:
    out = runs / table / _slug(label)
    done = all((out / f"seed-{s}" / "summary.json").is_file() for s in SEEDS)
    rss = None
    if not done:
        cmd = ["attnlab", "train", "--task", task, *args, "--seeds", *SEEDS,
               "--run-dir", str(out), "--no-progress"]
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not a running max
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode})")
        rss = usage.ru_maxrss  # KiB on Linux
        (out / "peak_rss_kib.txt").write_text(f"{rss}\n")
    elif (out / "peak_rss_kib.txt").is_file():
        text = (out / "peak_rss_kib.txt").read_text().strip()
        rss = int(text) if text else None
    sums = [json.loads((out / f"seed-{s}" / "summary.json").read_text()) for s in SEEDS]
    metric = sums[0]["metric"]
    values = [s["test"][metric] for s in sums]
    ci = confidence_interval(values)
    per_step = sum(s["train_time_s"] / max(1, s["steps"]) for s in sums) / len(sums)
    return {"table": table, "label": label, "task": task, "metric": metric,
            "mean": ci.mean, "half": (ci.high - ci.low) / 2, "values": values,
            "ms_per_step": 1e3 * per_step, "steps": sums[0]["steps"], "rss_kib": rss,
            "command": "attnlab train --task " + " ".join([task, *args, "--seeds", *SEEDS])}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="where the runs are (trained if missing)")
    parser.add_argument("--imdb-dir", type=Path, default=None,
                        help="IMDB's original files: adds the HAN table")
    args = parser.parse_args(argv)
    rows = [run_row(args.runs, *r) for r in ROWS]
    if args.imdb_dir is not None:
        data = ["--task-opt", f"data_dir={args.imdb_dir}"]
        rows += [run_row(args.runs, t, label, task, [*a, *data])
                 for t, label, task, a in IMDB_ROWS]
    for table in dict.fromkeys(r["table"] for r in rows):
        print(f"\n| {table} | task | test metric (mean ± 95% CI, 3 seeds) | per seed | "
              f"ms / step | steps | peak RSS |\n|---|---|---|---|---|---|---|")
        for r in (r for r in rows if r["table"] == table):
            rss = f"{r['rss_kib'] / 1024:.0f} MiB" if r["rss_kib"] else "-"
            seeds = " / ".join(f"{v:.3f}" for v in r["values"])
            print(f"| {r['label']} | {r['task']} | {r['metric']} {r['mean']:.3f} ± "
                  f"{r['half']:.3f} | {seeds} | {r['ms_per_step']:.1f} | {r['steps']} | "
                  f"{rss} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
