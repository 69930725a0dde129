"""Ring-attention benchmark: P local processes, each timing its own rank.

One point is ``(P, N, layout, pass, causal)``: :func:`launch` starts ``P`` processes (a
loopback process group, gloo on CPU, nccl on CUDA with one GPU per rank), each draws the
same full ``q, k, v`` from one seed, keeps its shard (:func:`attnlab.mechanisms.ring.shard`)
and measures :func:`measure_rank`:

* **time**: the median over ``repeats`` calls (forward, or forward and backward), the
  ranks lined up by a barrier before each call. A rank's time includes its waits; the
  job's time is the slowest rank's (the table's time; the JSON also has the mean), and
  ``vs P=1`` divides it by the one-process time at the same ``N`` (each process running
  ``threads`` threads, the one-process baseline too).
* **compute / communication**: the engine's own timers (:class:`RingStats`): seconds in
  the tile loops and seconds waiting for transfers (what the overlap did not hide); the
  communication share is wait / time. **Balance**: max / min across ranks of the compute
  time (and of the tiles computed): the work the layout gives each rank.
* **peak memory**: CPU: the peak RSS of one call above the RSS when it starts (``VmHWM``,
  reset just before, as :mod:`attnlab.bench.measure`), glibc's mmap threshold pinned low so
  every tensor above 16 KiB is its own mapping: tensors are what it measures (tracemalloc
  sees no tensor storage, torch's CPU allocator keeps no statistics). CUDA:
  ``torch.cuda.max_memory_allocated`` above the allocated bytes.

Each process runs ``threads`` torch threads (1 by default: ``P`` processes share the
machine's cores, and on a 2-core machine ``P = 4`` already oversubscribes them). Results do
not go to the SQLite store: its ``measurements`` rows are single-process points of a
:class:`~attnlab.bench.grid.Grid` run (one time, one peak) with no place for per-rank
times, balance or the communication share; they are returned as dicts (JSON, Markdown).
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import statistics
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from attnlab.bench.measure import peak_bytes
from attnlab.mechanisms.ring import shard
from attnlab.registry import create
from attnlab.util.fmt import format_bytes, format_length, format_time

__all__ = ["MARKDOWN_HEAD", "RingJobError", "free_port", "launch", "markdown_table",
           "measure_rank", "ring_point", "run_point", "run_ring_bench", "table_cells"]


class RingJobError(RuntimeError):
    """A rank of a launched group raised, died or ran past the timeout."""


def free_port() -> int:
    """A TCP port free on the loopback address now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, fn, P, port, backend, threads, timeout_s, args, fail_dir):
    """One process: join the group on the loopback address, run ``fn(rank, P, *args)``;
    a failure is also written, with its time, to ``fail_dir`` (see :func:`_first_failure`)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(P), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=P,
                                timeout=timedelta(seconds=timeout_s))
        fn(rank, P, *args)
    except BaseException:  # recorded before the group closes: the others fail after it
        record = {"rank": rank, "time": time.time(), "error": traceback.format_exc()}
        Path(fail_dir, f"rank{rank}.json").write_text(json.dumps(record))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _first_failure(fail_dir: str, P: int, fallback) -> str:
    """The rank that failed first and its traceback: the others' errors are most often
    its consequence (gloo's "Connection reset by peer" when it exits), named after it."""
    records = sorted((json.loads(f.read_text()) for f in Path(fail_dir).glob("rank*.json")),
                     key=lambda r: r["time"])
    if not records:  # died without a word (a signal, os._exit): what join saw
        return f"rank {fallback.error_index} of {P} failed: {fallback}"
    first, *then = records
    text = f"rank {first['rank']} of {P} failed first:\n{first['error']}"
    for r in then:
        text += f"\nthen rank {r['rank']} failed: {r['error'].strip().splitlines()[-1]}"
    return text


def launch(fn, nprocs: int, args: tuple = (), *, timeout_s: float = 120.0,
           backend: str = "gloo", threads: int = 1, start_method: str = "forkserver") -> None:
    """Run ``fn(rank, nprocs, *args)`` in ``nprocs`` new processes of one process group.

    ``fn`` must be importable by name (a module-level function). Returns when every rank
    has returned; raises :class:`RingJobError` with the traceback of the rank that failed
    first as soon as one raises or dies (the others are killed, never left waiting), or when
    ``timeout_s`` passes (every rank killed). ``forkserver`` (the default) forks each rank
    from a server that imported torch once: a rank then starts in a fraction of a second.
    """
    if backend == "nccl" and torch.cuda.device_count() < nprocs:
        raise RingJobError(f"backend nccl needs {nprocs} GPUs (one per rank); "
                           f"{torch.cuda.device_count()} found")
    if start_method == "forkserver":  # only before the server starts; then it is kept
        tmp.get_context("forkserver").set_forkserver_preload(["attnlab.bench.ring"])
    with tempfile.TemporaryDirectory(prefix="attnlab-ring-failures-") as fail_dir:
        _run(fn, nprocs, args, timeout_s, backend, threads, start_method, fail_dir)


def _run(fn, nprocs, args, timeout_s, backend, threads, start_method, fail_dir) -> None:
    port = free_port()
    ctx = tmp.start_processes(_rank_main, args=(fn, nprocs, port, backend, threads, timeout_s,
                                                args, fail_dir), nprocs=nprocs, join=False,
                              start_method=start_method)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                raise RingJobError(f"ring job of {nprocs} processes ran past {timeout_s:g} s "
                                   f"(ranks {alive} still running; all killed)")
    except (tmp.ProcessRaisedException, tmp.ProcessExitedException) as e:
        # raised or died: join has terminated the others already
        raise RingJobError(_first_failure(fail_dir, nprocs, e)) from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


# ------------------------------------------------------------------- one rank's work
def _pin_malloc() -> None:
    """Every tensor above 16 KiB its own mapping, returned to the kernel when freed: the
    peak RSS then follows the tensors (glibc otherwise serves later blocks unseen)."""
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 16 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD


def measure_rank(rank: int, P: int, point: dict, out_dir: str) -> None:
    """Measure ``point`` on this rank; writes ``rank{r}.json`` into ``out_dir``."""
    device = torch.device(f"cuda:{rank}" if point["device"] == "cuda" else "cpu")
    if device.type == "cpu":
        _pin_malloc()
    dtype = getattr(torch, point["dtype"])
    B, H, N, D = point["batch"], point["heads"], point["N"], point["head_dim"]
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(4)]
    q, k, v, dout = (shard(t, point["layout"], rank, P).to(device) for t in full)
    del full
    backward = point["pass_"] == "fwd+bwd"
    for t in (q, k, v):
        t.requires_grad_(backward)
    mech = create("ring", layout=point["layout"], block_size=point["block_size"])
    mech.stats.synchronize = True

    def step():
        with torch.set_grad_enabled(backward):
            out = mech(q, k, v, is_causal=point["causal"])
            if backward:
                out.backward(dout)
                q.grad = k.grad = v.grad = None

    step()  # warm-up: thread pools, the first transfers
    dist.barrier()
    peak = peak_bytes(step, device)
    mech.stats.reset()
    times = []
    for _ in range(point["repeats"]):
        dist.barrier()
        start = mech.stats.clock(device)
        step()
        times.append(mech.stats.clock(device) - start)
    s, r = mech.stats, point["repeats"]
    row = {"rank": rank, "time_s": statistics.median(times), "peak_mem_bytes": peak,
           "compute_s": s.compute_s / r, "comm_wait_s": s.comm_wait_s / r,
           "tiles_computed": s.tiles_computed // r, "tiles_skipped": s.tiles_skipped // r,
           "bytes_sent": s.bytes_sent // r}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(row))


# ------------------------------------------------------------------------ the sweep
def ring_point(P: int, N: int, layout: str, pass_: str, causal: bool, *, batch: int = 1,
               heads: int = 4, head_dim: int = 64, dtype: str = "float32",
               block_size: int = 256, repeats: int = 3, device: str = "cpu") -> dict:
    """One point's description (what :func:`measure_rank` reads and each row repeats)."""
    return {"P": P, "N": N, "layout": layout, "pass_": pass_, "causal": causal,
            "batch": batch, "heads": heads, "head_dim": head_dim, "dtype": dtype,
            "block_size": block_size, "repeats": repeats, "device": device}


def _summary(point: dict, ranks: list[dict]) -> dict:
    """The row of one point from its ranks' measurements."""
    times = [r["time_s"] for r in ranks]
    compute = [r["compute_s"] for r in ranks]
    tiles = [r["tiles_computed"] for r in ranks]
    return {**point, "status": "ok", "message": "",
            "time_s": statistics.fmean(times), "time_max_s": max(times),
            "time_min_s": min(times), "compute_max_s": max(compute),
            "compute_min_s": min(compute), "balance": max(compute) / max(min(compute), 1e-12),
            "comm_share": statistics.fmean(r["comm_wait_s"] / r["time_s"] for r in ranks),
            "peak_mem_bytes": max(r["peak_mem_bytes"] for r in ranks),
            "tiles_max": max(tiles), "tiles_min": min(tiles),
            "bytes_sent": max(r["bytes_sent"] for r in ranks), "ranks": ranks}


def run_point(point: dict, *, threads: int = 1, timeout_s: float = 600.0) -> dict:
    """Launch ``point["P"]`` processes on ``point``; its row (``status`` ok or error)."""
    P = point["P"]
    backend = "nccl" if point["device"] == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="attnlab-ring-") as out:
        try:
            launch(measure_rank, P, (point, out), timeout_s=timeout_s, backend=backend,
                   threads=threads)
        except RingJobError as e:
            return {**point, "status": "error", "message": str(e)[-2000:]}
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(P)]
    return _summary(point, ranks)


def run_ring_bench(procs, lengths, layouts, passes, causal, *, threads: int = 1,
                   timeout_s: float = 600.0, progress=None, **settings) -> list[dict]:
    """Every ``(P, N, layout, pass, causal)`` point, one launch each; rows in order.

    ``P = 1`` is one point per ``(N, pass, causal)`` (every layout is the identity there),
    its layout shown as ``-``: the baseline every ``P > 1`` row's overhead is taken over.
    ``settings``: :func:`ring_point`'s keywords. ``progress``: a ``rich`` Progress or None.
    """
    points = []
    for n in lengths:
        for pass_ in passes:
            for c in causal:
                for P in procs:
                    for layout in (layouts[:1] if P == 1 else layouts):
                        points.append(ring_point(P, n, layout, pass_, c, **settings))
    task = progress.add_task("ring", total=len(points)) if progress is not None else None
    rows = []
    for p in points:
        row = run_point(p, threads=threads, timeout_s=timeout_s)
        if p["P"] == 1:
            row["layout"] = "-"
        rows.append(row)
        if progress is not None:
            progress.advance(task)
    return rows


MARKDOWN_HEAD = ("P", "N", "layout", "pass", "time (slowest rank)", "vs P=1", "time max/min",
                 "compute max/min (balance)", "tiles max/min", "comm share",
                 "peak mem / process", "sent / rank")


def _baseline(rows: list[dict], row: dict) -> float | None:
    for r in rows:
        if r["P"] == 1 and r["status"] == "ok" and all(
                r[k] == row[k] for k in ("N", "pass_", "causal")):
            return r["time_max_s"]
    return None


def table_cells(rows: list[dict]) -> list[tuple[str, ...]]:
    """The printed cells of each row (:data:`MARKDOWN_HEAD`'s columns)."""
    out = []
    for r in rows:
        head = (str(r["P"]), format_length(r["N"]), r["layout"],
                r["pass_"] + (" causal" if r["causal"] else ""))
        if r["status"] != "ok":
            out.append((*head, r["status"], r["message"].splitlines()[-1][:80],
                        *("-",) * (len(MARKDOWN_HEAD) - 6)))
            continue
        base = _baseline(rows, r)
        out.append((*head, format_time(r["time_max_s"]),
                    "-" if base is None else f"{r['time_max_s'] / base:.2f}x",
                    f"{r['time_max_s'] / r['time_min_s']:.2f}",
                    f"{r['balance']:.2f}", f"{r['tiles_max']}/{r['tiles_min']}",
                    f"{100 * r['comm_share']:.0f}%", format_bytes(r["peak_mem_bytes"]),
                    format_bytes(r["bytes_sent"])))
    return out


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(MARKDOWN_HEAD) + " |", "|" + "---|" * len(MARKDOWN_HEAD)]
    lines += ["| " + " | ".join(c) + " |" for c in table_cells(rows)]
    return "\n".join(lines)
