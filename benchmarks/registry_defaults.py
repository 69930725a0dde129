"""Forward time and peak memory of every sub-quadratic mechanism with the registry defaults.

    python benchmarks/registry_defaults.py --out benchmarks/out/registry_defaults.json

Each mechanism is built exactly as a user gets it, ``attnlab.create_for(NAME, head_dim=D,
num_heads=H, max_seq_len=N)`` with no hyperparameter given (the benchmark profiles'
long-sequence overrides are *not* applied: they are what hid a default that broke its
promise), and run forward under ``torch.no_grad()`` as ``attnlab bench --pass fwd`` does.
Each point runs in its own spawned child process; its peak memory is the peak RSS
(``VmHWM``, reset once the inputs exist) above the RSS at that moment, during the first
call, measured with the functions of :mod:`attnlab.bench.measure`. Time is the median of
``torch.utils.benchmark.Timer.blocked_autorange``.

"Sub-quadratic" is read from the registry, not from a list: every mechanism whose
``memory`` claim has no ``N^2`` term (:func:`claims_subquadratic_memory`), so a new
mechanism is measured too. The budget printed is 25% of one ``N x N`` float32 score tensor.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import resource
import sys
import time

import torch

import attnlab
from attnlab.bench.measure import peak_rss_bytes, reset_peak_rss, rss_bytes

QUADRATIC = re.compile(r"N\s*\^\s*2|N²")


def claims_subquadratic_memory(name: str) -> bool:
    """Whether the registry's memory claim for ``name`` has no ``N^2`` term."""
    return not QUADRATIC.search(attnlab.get(name).memory)


def _child(conn, name, n, cfg):
    try:
        cap = cfg["mem_cap"]
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        torch.set_num_threads(cfg["threads"])
        B, H, D = cfg["B"], cfg["H"], cfg["D"]
        mech = attnlab.create_for(name, head_dim=D, num_heads=H, max_seq_len=n).eval()
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))

        def step():
            with torch.no_grad():
                return mech(q, k, v)

        reset_peak_rss()
        base = rss_bytes()
        step()  # the first call sets the peak: nothing ran in this process before it
        peak = max(0, peak_rss_bytes() - base)
        from torch.utils.benchmark import Timer

        m = Timer("step()", globals={"step": step}, num_threads=cfg["threads"]
                  ).blocked_autorange(min_run_time=cfg["min_run_time"])
        conn.send({"status": "ok", "median_s": m.median, "iqr_s": m.iqr, "peak_bytes": peak})
    except MemoryError as e:
        conn.send({"status": "oom", "message": str(e)[:200]})
    except Exception as e:  # recorded, never a number
        conn.send({"status": "error", "message": f"{type(e).__name__}: {e}"[:300]})


def run_point(name, n, cfg) -> dict:
    ctx = mp.get_context("spawn")  # a fresh interpreter: its peak RSS is this point's alone
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, name, n, cfg))
    proc.start()
    child.close()
    res = parent.recv() if parent.poll(cfg["timeout"]) else None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if res is None:
        res = {"status": "timeout" if proc.exitcode is None or proc.exitcode == -9 else
               "error", "message": f"child exit code {proc.exitcode}"}
    return {"mechanism": name, "N": n, **res}


def markdown(results, lengths) -> str:
    by = {(r["mechanism"], r["N"]): r for r in results}
    names = list(dict.fromkeys(r["mechanism"] for r in results))
    head = ["mechanism", *(f"MiB @ {n // 1024}K" for n in lengths),
            *(f"s @ {n // 1024}K" for n in lengths)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        mem, sec = [], []
        for n in lengths:
            r = by.get((name, n), {})
            ok = r.get("status") == "ok"
            mem.append(f"{r['peak_bytes'] / 2**20:.0f}" if ok else r.get("status", "").upper())
            sec.append(f"{r['median_s']:.3f}" if ok else "")
        rows.append(f"| `{name}` | " + " | ".join(mem + sec) + " |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--mechanisms", nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-cap-gib", type=float, default=14.0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--min-run-time", type=float, default=0.3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    names = a.mechanisms or [m for m in attnlab.list_mechanisms()
                             if claims_subquadratic_memory(m)]
    cfg = {"B": a.batch, "H": a.heads, "D": a.head_dim, "threads": a.threads,
           "mem_cap": int(a.mem_cap_gib * 2**30), "timeout": a.timeout,
           "min_run_time": a.min_run_time}
    lengths = sorted(a.n)
    results = []
    t0 = time.time()
    for name in names:
        for n in lengths:
            r = run_point(name, n, cfg)
            results.append(r)
            print(json.dumps(r), flush=True)
    info = {"command": " ".join(sys.argv), "config": cfg, "torch": torch.__version__,
            "wall_s": time.time() - t0, "results": results}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(info, f, indent=1)
    budget = 0.25 * a.batch * 16384**2 * 4 / 2**20
    print(f"\nbudget at 16K: 25% of one N x N float32 tensor = {budget:.0f} MiB")
    print(markdown(results, lengths))


if __name__ == "__main__":
    main()
