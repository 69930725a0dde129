"""Generation benchmark: what decoding one token costs after a long prompt.

A causal layer decodes either with a KV cache (the exact family: every past key kept,
O(T) memory and time per token at context T) or with the mechanism's own bounded state
(registry flag ``decode_state``: ``linear``'s ``S = sum phi(k) v^T``, a rolling window,
the gated recurrences; O(1) in T). One point is one mechanism at one prompt length:

1. a causal :class:`attnlab.nn.MultiheadAttention` (float32, eval, no autograd) reads the
   prompt in one prefill call (timed: ``prefill_s``);
2. then ``new_tokens`` tokens one call each, each timed: ``tokens_per_s`` is their count
   over their total time, ``first_ms`` / ``last_ms`` the median time of the first and the
   last quarter (flat for a bounded state, growing with T for a KV cache);
3. ``cache_bytes``: the bytes the cache holds after the last token (the keys and values,
   or the state: :func:`attnlab.nn.cache.state_nbytes`); ``peak_decode_bytes``: the peak
   RSS during step 2 above the RSS when it began (the memory decoding itself needs).

Each point runs in a fresh child process (spawned), so its peak is its own and a crash or
a timeout costs one point. The attention layer alone is measured: a model adds the same
feed-forward work per token to every mechanism. Rows go to the results database's
``generations`` table (:meth:`attnlab.bench.store.Store.add_generation`).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import statistics
import time
from typing import Any

import torch

from attnlab.bench.machine import describe
from attnlab.bench.measure import peak_rss_bytes, reset_peak_rss, rss_bytes
from attnlab.nn import KVCache, MultiheadAttention
from attnlab.nn.cache import state_nbytes
from attnlab.registry import get, resolve_name
from attnlab.util.checks import check_int

__all__ = ["GENERATION_COLUMNS", "decoding_kind", "measure_generation", "run_generation"]

GENERATION_COLUMNS = ("mechanism", "hparams", "prompt_len", "new_tokens", "embed_dim",
                      "num_heads", "threads", "kind", "status", "prefill_s", "tokens_per_s",
                      "first_ms", "last_ms", "cache_bytes", "peak_decode_bytes", "message")


def decoding_kind(name: str) -> str | None:
    """``"kv_cache"``, ``"state"`` or ``None`` (the mechanism can only recompute)."""
    spec = get(name)
    return "kv_cache" if spec.kv_cache else "state" if spec.decode_state else None


def _cache_bytes(cache) -> int:
    if isinstance(cache, KVCache):
        return state_nbytes((cache.k, cache.v))
    return cache.nbytes


@torch.no_grad()
def measure_generation(mechanism: str, *, prompt_len: int, new_tokens: int = 256,
                       embed_dim: int = 512, num_heads: int = 8, hparams: dict | None = None,
                       threads: int = 2, seed: int = 0) -> dict[str, Any]:
    """One point, in this process (see the module docstring); returns its row."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    layer = MultiheadAttention(embed_dim, num_heads, mechanism, is_causal=True,
                               **dict(hparams or {}),
                               max_seq_len=prompt_len + new_tokens).eval()
    x = torch.randn(1, prompt_len + new_tokens, embed_dim)
    cache = layer.new_cache()
    start = time.perf_counter()
    layer(x[:, :prompt_len], kv_cache=cache)
    prefill = time.perf_counter() - start
    reset_peak_rss()
    base = rss_bytes()
    times = []
    for t in range(prompt_len, prompt_len + new_tokens):
        start = time.perf_counter()
        layer(x[:, t:t + 1], kv_cache=cache)
        times.append(time.perf_counter() - start)
    quarter = max(1, new_tokens // 4)
    return {"prefill_s": prefill, "tokens_per_s": new_tokens / sum(times),
            "first_ms": 1e3 * statistics.median(times[:quarter]),
            "last_ms": 1e3 * statistics.median(times[-quarter:]),
            "cache_bytes": _cache_bytes(cache),
            "peak_decode_bytes": max(0, peak_rss_bytes() - base), "status": "ok",
            "message": ""}


def _point_row(mechanism: str, hparams: dict, prompt_len: int, settings: dict) -> dict:
    return {"mechanism": mechanism, "hparams": dict(hparams), "prompt_len": prompt_len,
            "new_tokens": settings["new_tokens"], "embed_dim": settings["embed_dim"],
            "num_heads": settings["num_heads"], "threads": settings["threads"],
            "kind": decoding_kind(mechanism)}


def _run_point(pool_args: tuple, timeout: float) -> dict:
    """The point in a fresh spawned process: ``status`` "ok", "error" or "timeout"."""
    mechanism, hparams, prompt_len, settings = pool_args
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        fut = pool.submit(measure_generation, mechanism, prompt_len=prompt_len,
                          hparams=hparams, **settings)
        try:
            return fut.result(timeout=timeout)
        except cf.TimeoutError:
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()  # the child is stuck in its loop: nothing else stops it
            return {"status": "timeout", "message": f"over {timeout:.0f} s"}
        except Exception as e:  # noqa: BLE001 - the child's error is this point's result
            return {"status": "error", "message": f"{type(e).__name__}: {e}"}


def run_generation(mechanisms: list[str | dict], prompts: list[int], *, new_tokens: int = 256,
                   embed_dim: int = 512, num_heads: int = 8, threads: int = 2,
                   timeout_s: float = 600.0, store=None, progress=None) -> list[dict]:
    """Every (mechanism, prompt length) point; rows in order, also added to ``store``.

    ``mechanisms``: names, or ``{"name": ..., **hparams}``. A mechanism that can neither
    keep a KV cache nor a state is refused here (it could only recompute the prefix, O(T^2)
    per sequence: nothing to compare per token). ``progress``: a ``rich`` Progress or None.
    """
    for name, value in (("new_tokens", new_tokens), ("embed_dim", embed_dim),
                        ("num_heads", num_heads), ("threads", threads)):
        check_int(name, value, low=1, who="run_generation")
    entries = []
    for m in mechanisms:
        entry = dict(m) if isinstance(m, dict) else {"name": m}
        name = resolve_name(entry.pop("name"))
        if decoding_kind(name) is None:
            raise ValueError(f"run_generation: mechanism {name!r} decodes with neither a KV "
                             f"cache nor a bounded state (registry flags kv_cache, "
                             f"decode_state); nothing to measure per token")
        entries.append((name, entry))
    for p in prompts:
        check_int("prompt length", p, low=1, who="run_generation")
    settings = {"new_tokens": new_tokens, "embed_dim": embed_dim, "num_heads": num_heads,
                "threads": threads}
    machine = describe()
    rows = []
    task = progress.add_task("generation", total=len(entries) * len(prompts)) if progress \
        else None
    for name, hp in entries:
        for p in prompts:
            row = _point_row(name, hp, p, settings)
            row.update({c: None for c in GENERATION_COLUMNS if c not in row})
            row.update(_run_point((name, hp, p, settings), timeout_s))
            rows.append(row)
            if store is not None:
                store.add_generation(row, machine)
            if progress is not None:
                progress.advance(task)
    return rows
