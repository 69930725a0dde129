"""Median and spread over repeated ``attnlab bench`` runs: time, GFLOP/s, roof fraction.

On a shared machine one run is one sample of the load as much as of the code, so the
figures in docs/benchmarks.md are medians over several runs of the same grid with their
min-max range, and ratios (``× sdpa``) are taken within each run before the median.

    python benchmarks/bench_spread.py --db results/flops-roof-1t.db --runs 1 2 3
"""

from __future__ import annotations

import argparse
import statistics

from attnlab.bench.store import Store


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--runs", nargs="+", required=True, help="run ids of the same grid")
    ap.add_argument("--baseline", default="sdpa")
    a = ap.parse_args()
    points: dict[tuple, dict[str, list[float]]] = {}
    with Store(a.db, readonly=True) as s:
        for rid in a.runs:
            m = s.run(rid)["machine"]
            print(f"run {rid}: roof start {m.get('roof_start_gflops', float('nan')):.1f}, end "
                  f"{m.get('roof_end_gflops', float('nan')):.1f}, best "
                  f"{m['roof_gflops']:.1f} GFLOP/s")
            rows = [r for r in s.measurements(rid) if r["status"] == "ok"]
            base = {(r["N"], r["pass_"], r["causal"]): r["time_s"] for r in rows
                    if r["label"] == a.baseline}
            for r in rows:
                key = (r["N"], r["pass_"], r["causal"], r["label"])
                d = points.setdefault(key, {"time": [], "ratio": [], "gflops": [], "roof": [],
                                            "method": set()})
                d["time"].append(r["time_s"])
                d["gflops"].append(r["gflops_per_s"])
                d["method"].add(r["flops_method"])
                if r["roof_fraction"] is not None:
                    d["roof"].append(100 * r["roof_fraction"])
                b = base.get(key[:3])
                if b:
                    d["ratio"].append(r["time_s"] / b)
    print(f"\n| N | pass | mechanism | time (s) | × {a.baseline} | GFLOP/s | % of roof | FLOPs |")
    print("|---|---|---|---|---|---|---|---|")
    for (n, p, causal, label), d in sorted(points.items(), key=lambda kv: (
            kv[0][2], kv[0][1], kv[0][0], statistics.median(kv[1]["time"]))):
        print(f"| {n} | {p}{' causal' if causal else ''} | {label} | "
              f"{_spread(d['time'], '.3f')} | {_spread(d['ratio'], '.2f')} | "
              f"{_spread(d['gflops'], '.1f')} | {_spread(d['roof'], '.0f')} | "
              f"{'/'.join(sorted(map(str, d['method'])))} |")


if __name__ == "__main__":
    main()
