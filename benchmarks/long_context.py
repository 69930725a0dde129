"""Scaling of the long-context mechanisms with sequence length, side by side in one run.

    python benchmarks/long_context.py --out benchmarks/out/long_context.json

For every registered approximate mechanism (plus ``sdpa`` and ``flash`` as the exact
yardsticks) this measures forward time and peak
memory from 1K to 32K tokens (64K for the kernel family), each point in its own child
process (see ``_harness.py``). It then reports, from the data:

* the fitted time exponent (least-squares slope of log time on log N over 4K..32K);
* peak memory at 16K as a fraction of what ``reference`` needs there (its two
  ``(B, H, N, N)`` float32 tensors: scores and weights);
* speed-up over ``sdpa`` at each length.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from _harness import machine, matmul_roof_gflops, run_point

import attnlab

# Windows, buckets and ranks as in the papers' defaults, sized for long inputs.
HPARAMS = {
    "sliding_window": {"window": 256},
    "local": {"block_size": 256},
    "dilated_window": {"window": 256},
    "longformer": {"window": 256},
    "bigbird": {"window": 256},
}
BASELINES = ("sdpa", "flash")


def approximate() -> list[str]:
    """The efficient-transformer mechanisms: every registered approximation of softmax
    attention (the exact ones, synthesizers included, are O(N^2) by definition)."""
    return attnlab.list_mechanisms(exact=False)


def fit_exponent(points: list[tuple[int, float]], lo: int, hi: int) -> float | None:
    pts = [(math.log(n), math.log(t)) for n, t in points if lo <= n <= hi and t > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--n-linear", type=int, nargs="+", default=[65536],
                    help="extra lengths for the kernel (linear) family")
    ap.add_argument("--mechanisms", nargs="+", default=None)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-cap-gib", type=float, default=16.0)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--min-run-time", type=float, default=0.5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    names = a.mechanisms or [*BASELINES, *approximate()]
    cfg = {"B": 1, "H": 8, "D": 64, "threads": a.threads, "causal": a.causal,
           "mem_cap": int(a.mem_cap_gib * 2**30), "timeout": a.timeout,
           "min_run_time": a.min_run_time, "hparams": HPARAMS}
    info = {"machine": machine(), "config": {k: v for k, v in cfg.items()},
            "roof_gflops": matmul_roof_gflops(a.threads), "command": " ".join(sys.argv),
            "results": []}
    print(json.dumps({k: v for k, v in info.items() if k != "results"}, indent=1), flush=True)
    for name in names:
        lengths = list(a.n)
        if attnlab.get(name).family == "kernel":
            lengths += a.n_linear
        failed = False
        for n in lengths:
            if failed:  # a length that ran out of memory or time: longer ones will too
                info["results"].append({"mechanism": name, "N": n, "status": "skipped"})
                continue
            r = run_point(name, n, "fwd", cfg)
            info["results"].append(r)
            print(json.dumps(r), flush=True)
            failed = r["status"] != "ok"
    if a.out:
        with open(a.out, "w") as f:
            json.dump(info, f, indent=1)
    print(markdown(info, a.n))


def markdown(info, lengths) -> str:
    res = [r for r in info["results"] if r.get("status") == "ok"]
    by = {(r["mechanism"], r["N"]): r for r in res}
    names = list(dict.fromkeys(r["mechanism"] for r in info["results"]))
    all_n = sorted({r["N"] for r in info["results"]})
    B, H = info["config"]["B"], info["config"]["H"]
    head = ("| mechanism | " + " | ".join(f"{n // 1024}K" for n in all_n)
            + " | exponent 4K–32K | mem@16K / reference | × sdpa @16K |")
    rows = [head, "|" + "---|" * (len(all_n) + 4)]
    ref_16k = 2 * B * H * 16384**2 * 4  # scores + weights, float32
    for name in names:
        cells = []
        for n in all_n:
            r = by.get((name, n))
            if r is not None:
                cells.append(f"{r['median_s']:.3f}")
            else:
                st = next((x["status"] for x in info["results"]
                           if x["mechanism"] == name and x["N"] == n), "")
                cells.append(st.upper() if st else "")
        exp = fit_exponent([(n, by[(name, n)]["median_s"]) for n in all_n if (name, n) in by],
                           4096, 32768)
        m16 = by.get((name, 16384))
        mem = f"{100 * m16['peak_bytes'] / ref_16k:.1f}%" if m16 else ""
        s16 = by.get(("sdpa", 16384))
        speed = f"{s16['median_s'] / m16['median_s']:.2f}" if (m16 and s16) else ""
        rows.append(f"| {name} | " + " | ".join(cells)
                    + f" | {'' if exp is None else f'{exp:.2f}'} | {mem} | {speed} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
