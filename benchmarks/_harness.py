"""Shared measurement harness for the scripts in ``benchmarks/``.

Each (mechanism, N, pass) point runs in its own child process so that its peak memory
is its own and an out-of-memory costs only that point (the child's address space is
capped with RLIMIT_AS). Peak memory is the child's peak RSS (VmHWM, reset once the
inputs exist) above its RSS at that moment, during the first call. Time is the median
of ``torch.utils.benchmark.Timer``'s ``blocked_autorange``. FLOPs are exact attention's,
counted by ``torch.utils.flop_counter.FlopCounterMode`` on SDPA with meta tensors, and
the same count is used for every mechanism so GFLOP/s compare like with like. The roof
is the measured fp32 GFLOP/s of a 4096^3 matmul on the same threads.
"""

from __future__ import annotations

import multiprocessing as mp
import platform
import resource
import time

import torch

from attnlab.bench.measure import peak_rss_bytes as _peak_rss_bytes
from attnlab.bench.measure import reset_peak_rss as _reset_peak_rss
from attnlab.bench.measure import rss_bytes as _rss_bytes


def _child(conn, mech_name, n, p, cfg):
    """Measure one point; send back a dict (status ok / oom / error)."""
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cfg["mem_cap"], cfg["mem_cap"]))
        torch.set_num_threads(cfg["threads"])
        import attnlab

        B, H, D = cfg["B"], cfg["H"], cfg["D"]
        mech = attnlab.create_for(mech_name, head_dim=D, num_heads=H, max_seq_len=n,
                                  **cfg.get("hparams", {}).get(mech_name, {}))
        causal = cfg.get("causal", False)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
        backward = p == "fwd+bwd"
        if backward:
            for t in (q, k, v):
                t.requires_grad_()
        grad = torch.randn(B, H, n, D, generator=g)

        def step():
            out = mech(q, k, v, is_causal=causal)
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
