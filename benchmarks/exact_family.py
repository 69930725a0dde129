"""Time, peak memory and achieved GFLOP/s of the exact family, side by side in one run.

    python benchmarks/exact_family.py --out benchmarks/out/exact_family.json

See ``_harness.py`` for how each point is measured (own child process, RSS peak,
``torch.utils.benchmark``, FlopCounterMode); results are quoted in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from _harness import exact_flops, machine, matmul_roof_gflops, run_point

MECHANISMS = ("sdpa", "flash", "reference")
PASSES = ("fwd", "fwd+bwd")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-cap-gib", type=float, default=18.0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    a = ap.parse_args(argv)
    cfg = {"B": a.batch, "H": a.heads, "D": a.head_dim, "threads": a.threads,
           "mem_cap": int(a.mem_cap_gib * 2**30), "timeout": a.timeout,
           "min_run_time": a.min_run_time}
    info = {"machine": machine(), "config": {k: v for k, v in cfg.items()},
            "roof_gflops": matmul_roof_gflops(a.threads), "command": " ".join(sys.argv)}
    print(json.dumps(info, indent=1), flush=True)
    results = []
    for n in a.n:
        for p in PASSES:
            flops = exact_flops(a.batch, a.heads, n, a.head_dim, p == "fwd+bwd")
            for name in a.mechanisms:
                r = run_point(name, n, p, cfg)
                r["flops"] = flops
                if r["status"] == "ok":
                    r["gflops"] = flops / r["median_s"] / 1e9
                results.append(r)
                print(json.dumps(r), flush=True)
    info["results"] = results
    if a.out:
        with open(a.out, "w") as f:
            json.dump(info, f, indent=1)
    print(markdown(info))


def markdown(info):
    """The docs table: time and memory with ratios to sdpa at the same point."""
    rows = ["| N | pass | mechanism | time (s) | × sdpa | peak MiB above inputs | × sdpa "
            "| GFLOP/s | % of roof |", "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["N"], r["pass_"], r["mechanism"]): r for r in info["results"]}
    for (n, p, name), r in by.items():
        base = by.get((n, p, "sdpa"))
        if r["status"] != "ok":
            rows.append(f"| {n} | {p} | {name} | {r['status'].upper()} | | | | | |")
            continue
        ok = base and base["status"] == "ok"
        tr = f"{r['median_s'] / base['median_s']:.2f}" if ok else ""
        mr = f"{r['peak_bytes'] / max(base['peak_bytes'], 1):.2f}" if ok else ""
        rows.append(f"| {n} | {p} | {name} | {r['median_s']:.3f} | {tr} | "
                    f"{r['peak_bytes'] / 2**20:.0f} | {mr} | {r['gflops']:.1f} | "
                    f"{100 * r['gflops'] / info['roof_gflops']:.0f}% |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
