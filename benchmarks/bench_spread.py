"""Median and spread over repeated ``attnlab bench`` runs: time, memory, GFLOP/s, roof.

A reader of an ``attnlab bench`` results database: it measures nothing. On a shared
machine one run is one sample of the load as much as of the code, so the figures in
docs/benchmarks.md are medians over several runs of the same grid with their min-max
range, and ratios (``× sdpa``) are taken within each run before the median. Peak memory
is the point's peak RSS above its inputs, as stored. A point that is not ``ok`` in any run
shows its status (``OOM``, ``timeout``, ...), never a number.

    python benchmarks/bench_spread.py --db results/flops-roof-1t.db --runs 1 2 3
"""

from __future__ import annotations

import argparse
import statistics

from attnlab.bench.analysis import status_word
from attnlab.bench.store import Store

COLUMNS = ("time", "ratio", "mem", "mem_ratio", "gflops", "roof")


def spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def collect(store: Store, runs: list[str], baseline: str) -> dict[tuple, dict]:
    """Per point ``(N, pass, causal, label)``: each column's values over the runs (ok
    points only), the FLOP methods and the statuses of the points that were not ok."""
    points: dict[tuple, dict] = {}
    for rid in runs:
        rows = store.measurements(rid)
        ok = [r for r in rows if r["status"] == "ok"]
        base = {(r["N"], r["pass_"], r["causal"]): r for r in ok if r["label"] == baseline}
        for r in rows:
            key = (r["N"], r["pass_"], r["causal"], r["label"])
            d = points.setdefault(key, {**{c: [] for c in COLUMNS}, "method": set(),
                                        "status": set()})
            if r["status"] != "ok":
                d["status"].add(status_word(r["status"]))
                continue
            d["time"].append(r["time_s"])
            if r["peak_mem_bytes"] is not None:
                d["mem"].append(r["peak_mem_bytes"] / 2**20)
            if r["gflops_per_s"] is not None:
                d["gflops"].append(r["gflops_per_s"])
            if r["flops_method"]:
                d["method"].add(r["flops_method"])
            if r["roof_fraction"] is not None:
                d["roof"].append(100 * r["roof_fraction"])
            b = base.get(key[:3])
            if b:
                d["ratio"].append(r["time_s"] / b["time_s"])
                if b["peak_mem_bytes"] and r["peak_mem_bytes"] is not None:
                    d["mem_ratio"].append(r["peak_mem_bytes"] / b["peak_mem_bytes"])
    return points


def table(points: dict[tuple, dict], baseline: str) -> str:
    out = [f"| N | pass | mechanism | time (s) | × {baseline} | peak MiB above inputs | "
           f"× {baseline} | GFLOP/s | % of roof | FLOPs |", "|" + "---|" * 10]

    def order(kv):
        (n, p, causal, label), d = kv
        return (causal, p, n, statistics.median(d["time"]) if d["time"] else float("inf"),
                label)

    for (n, p, causal, label), d in sorted(points.items(), key=order):
        head = f"| {n} | {p}{' causal' if causal else ''} | {label} | "
        if not d["time"]:
            out.append(head + "/".join(sorted(d["status"])) + " | | | | | | |")
            continue
        cells = [spread(d["time"], ".3f"), spread(d["ratio"], ".2f"), spread(d["mem"], ".0f"),
                 spread(d["mem_ratio"], ".2f"), spread(d["gflops"], ".1f"),
                 spread(d["roof"], ".0f"), "/".join(sorted(d["method"])) or "-"]
        if d["status"]:  # ok in some runs only: say so rather than hide the others
            cells[-1] += f" (also {'/'.join(sorted(d['status']))})"
        out.append(head + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--runs", nargs="+", required=True,
                    help="run ids of the same grid ('latest' for the newest)")
    ap.add_argument("--baseline", default="sdpa")
    a = ap.parse_args(argv)
    with Store(a.db, readonly=True) as s:
        runs = [s.resolve(r) for r in a.runs]
        for rid in runs:
            m = s.run(rid)["machine"]
            start, end, best = (m.get(k) or float("nan") for k in
                                ("roof_start_gflops", "roof_end_gflops", "roof_gflops"))
            print(f"run {rid}: roof start {start:.1f}, end {end:.1f}, best {best:.1f} GFLOP/s")
        points = collect(s, runs, a.baseline)
    print()
    print(table(points, a.baseline))


if __name__ == "__main__":
    main()
