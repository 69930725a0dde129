"""Markdown table of finished training runs (their summary.json), for docs/training.md.

    python benchmarks/training_table.py runs/emotions/sdpa runs/emotions/lstm ...

Each argument is a run directory made by ``attnlab train`` (the multi-seed directory, whose
summary.json holds mean ± std, or one ``seed-N`` directory).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):  # {"mean", "std", "n"}
        if v["n"] > 1:
            return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"
        return f"{v['mean']:.{digits}f}"
    return f"{v:.{digits}f}"


def row(run_dir: Path) -> str:
    s = json.loads((run_dir / "summary.json").read_text())
    multi = "seeds" in s
    metric = s["metric"]
    who = s["mechanism"] if s["model"] == "transformer" else s["model"]
    test = s["test"][metric]
    extra = [k for k in ("macro_f1", "word_perplexity", "ssim", "sequence_accuracy")
             if k in s["test"]]
    best = s["best_validation"] if multi else s["best_validation"][metric]
    conv = s.get("convergence_time_s") if multi else (s.get("convergence") or {}).get("time")
    steps = s["steps"]["mean"] if multi else s["steps"]
    t = s["train_time_s"]["mean"] if multi else s["train_time_s"]
    tput = s["throughput"]["mean"] if multi else s["throughput"]
    seeds = len(s["seeds"]) if multi else 1
    cells = [s["task"], who, f"{s['parameters'] / 1e6:.2f}M", str(seeds), f"{steps:.0f}",
             f"{t / 60:.1f}", f"{tput:,.0f} {s['throughput_unit']}", _fmt(best),
             f"**{_fmt(test)}** {metric}",
             ", ".join(f"{k} {_fmt(s['test'][k])}" for k in extra) or "-",
             _fmt(conv, 0) + " s" if conv is not None else "-"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args()
    print("| task | model | params | seeds | steps | train min | throughput | best val | "
          "test | also | time to 95% of best val |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in args.runs:
        print(row(r))


if __name__ == "__main__":
    main()
