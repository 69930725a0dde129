"""Time, peak memory and achieved GFLOP/s of the exact family, side by side in one run.

    python benchmarks/exact_family.py --out docs/bench/exact_family.json

Each (mechanism, N, pass) point runs in its own child process so that its peak memory
is its own and an out-of-memory costs only that point (the child's address space is
capped with RLIMIT_AS). Peak memory is the child's peak RSS (VmHWM, reset once the
inputs exist) above its RSS at that moment, during the first call. Time is the median
of ``torch.utils.benchmark.Timer``'s ``blocked_autorange``; FLOPs are exact attention's, counted by
``torch.utils.flop_counter.FlopCounterMode`` on SDPA with meta tensors, and the same
count is used for every mechanism so GFLOP/s compare like with like. The roof is the
measured fp32 GFLOP/s of a 4096^3 matmul on the same threads.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import time

import torch

MECHANISMS = ("sdpa", "flash", "reference")
PASSES = ("fwd", "fwd+bwd")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    # Linux >= 4.0: writing 5 resets VmHWM (peak RSS) to the current RSS, so the peak
    # read afterwards is this point's alone, not torch's import-time high-water mark.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(conn, mech_name, n, p, cfg):
    """Measure one point; send back a dict (status ok / oom / error)."""
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cfg["mem_cap"], cfg["mem_cap"]))
        torch.set_num_threads(cfg["threads"])
        import attnlab

        B, H, D = cfg["B"], cfg["H"], cfg["D"]
        mech = attnlab.create(mech_name)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
        backward = p == "fwd+bwd"
        if backward:
            for t in (q, k, v):
                t.requires_grad_()
        grad = torch.randn(B, H, n, D, generator=g)

        def step():
            out = mech(q, k, v)
            if backward:
                out.backward(grad)
                q.grad = k.grad = v.grad = None
            return out

        _reset_peak_rss()
        base = _rss_bytes()
        step()  # the first call also sets the peak: nothing ran before it
        peak = _peak_rss_bytes() - base
        from torch.utils.benchmark import Timer

        t = Timer("step()", globals={"step": step}, num_threads=cfg["threads"])
        m = t.blocked_autorange(min_run_time=cfg["min_run_time"])
        conn.send({"status": "ok", "median_s": m.median, "iqr_s": m.iqr,
                   "runs": len(m.times) * m.number_per_run, "peak_bytes": peak})
    except (MemoryError, RuntimeError) as e:
        oom = isinstance(e, MemoryError) or "alloc" in str(e).lower() or "memory" in str(e).lower()
        conn.send({"status": "oom" if oom else "error", "message": str(e)[:300]})
    except Exception as e:  # recorded, never a number
        conn.send({"status": "error", "message": f"{type(e).__name__}: {e}"[:300]})


def run_point(mech_name, n, p, cfg):
    ctx = mp.get_context("spawn")  # a fresh interpreter: its peak RSS is this point's alone
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, mech_name, n, p, cfg))
    t0 = time.time()
    proc.start()
    child.close()
    res = None
    if parent.poll(cfg["timeout"]):
        try:
            res = parent.recv()
        except EOFError:
            res = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
        res = res or {"status": "timeout", "message": f"over {cfg['timeout']} s"}
    if res is None:  # the child died without a word: killed by the kernel's OOM killer
        res = {"status": "oom" if proc.exitcode in (-9, 137) else "error",
               "message": f"child exit code {proc.exitcode}"}
    res.update(mechanism=mech_name, N=n, pass_=p, wall_s=time.time() - t0)
    return res


def exact_flops(B, H, n, D, backward):
    """FLOPs of exact attention, from PyTorch's own counter on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.empty(B, H, n, D, device="meta", requires_grad=backward) for _ in range(3))
    with FlopCounterMode(display=False) as fc:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if backward:
            out.backward(torch.empty_like(out))
    return fc.get_total_flops()


def matmul_roof_gflops(threads, size=4096):
    torch.set_num_threads(threads)
    from torch.utils.benchmark import Timer

    a, b = torch.randn(size, size), torch.randn(size, size)
    m = Timer("a @ b", globals={"a": a, "b": b}, num_threads=threads).blocked_autorange(
        min_run_time=2)
    return 2 * size**3 / m.median / 1e9


def machine():
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import attnlab

    return {"cpu": cpu, "logical_cores": mp.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "attnlab": attnlab.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


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
