"""One point, measured inside its own child process (see :mod:`attnlab.bench.runner`).

Order matters: the correctness gate first (a failing mechanism is never timed), then the
peak memory of the first call (nothing else has run in this process since its inputs were
made), then FLOPs, then time, and last the error against exact attention (whose own memory
must not count).

* **Gate**: :func:`attnlab.verify.verify` on the point's head dim, dtype and causality at
  ``min(N, 256)`` tokens: the mechanism in its limit case against its reference.
* **Peak memory**: CPU: the peak RSS (``VmHWM``, reset just before the call) above the
  RSS at that moment. CUDA: ``torch.cuda.max_memory_allocated`` above the allocated bytes.
* **FLOPs**: the work the point needs. A mechanism with a FLOP model in the registry
  (``spec.flops``: the exact softmax-attention family) is counted analytically
  (:mod:`attnlab.flops`: ``4 B H Nq Nk D`` forward, only the allowed pairs when causal,
  backward = 2 x forward); any other is counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` around one call (its matmuls and SDPA;
  elementwise work is not counted). ``flops_method`` says which.
* **Hyperparameters**: the built module's own (``mech.hp``: registry defaults filled in,
  including any derived from ``max_seq_len``), with those it decides per call (a ``None``
  or ``"auto"`` value whose module has ``<name>_for``: ``sparse_transformer``'s
  ``stride_for(n)``, the sparse engine's ``backend_for(q, k, v)``) as decided for this
  point, returned as ``effective_hparams``.
* **Time**: median and IQR of :meth:`torch.utils.benchmark.Timer.blocked_autorange`.
* **Error**: ``||out - exact|| / ||exact||`` with ``exact = F.scaled_dot_product_attention``
  in float32 on the same inputs (skipped above ``error_max_n``: exact costs O(N^2)).
"""

from __future__ import annotations

import inspect
import json
import math
import resource
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import flop_counter as fc
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

from attnlab.bench import layouts, peers
from attnlab.bench.peers import is_peer, verify_peer
from attnlab.flops import model_name
from attnlab.registry import create_for, get
from attnlab.verify import verify

__all__ = ["measure_point", "warm_up", "peak_bytes", "peak_rss_bytes", "reset_peak_rss",
           "rss_bytes"]

GATE_MAX_N = 256


def _teach_flop_counter() -> None:
    """Teach ``FlopCounterMode`` what it misses on CPU, for the mechanisms it counts.

    torch counts the CUDA SDPA kernels but not ``_scaled_dot_product_flash_attention_for_cpu``
    (and its backward): without this, SDPA on CPU would count 0 FLOPs (same formulas as
    torch's own for the CUDA kernels, matmuls only). Nor does it count the in-place
    ``baddbmm_`` / ``addmm_`` (the causal kernel-attention scan accumulates with them): they
    get the formulas of their out-of-place forms.
    """
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:
        @fc.register_flop_formula(fwd)
        def _fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query, key, value)  # shapes, not tensors
    if bwd is not None and bwd not in fc.flop_registry:
        @fc.register_flop_formula(bwd)
        def _bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out, query, key, value)
    for inplace, formula in ((aten.baddbmm_, fc.baddbmm_flop), (aten.addmm_, fc.addmm_flop)):
        if inplace not in fc.flop_registry:  # formula: already taking shapes, hence raw
            fc.register_flop_formula(inplace, get_raw=True)(formula)


_teach_flop_counter()


def warm_up() -> None:
    """Import now what the first measurement would import lazily (FlopCounterMode pulls in
    torch._dynamo and sympy: about a second). The runner's forkserver runs it once (module
    :mod:`attnlab.bench.warm`), so every child it forks starts with it done."""
    with FlopCounterMode(display=False):
        torch.ones(2, 2) @ torch.ones(2, 2)



def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    # Linux >= 4.0: writing 5 resets VmHWM (peak RSS) to the current RSS, so the peak read
    # afterwards is this call's alone, not the import's or the inputs' high-water mark.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gate(p: dict, dtype: torch.dtype) -> tuple[dict | None, dict]:
    """``(None, info)`` when the mechanism passes its limit-case check, else the FAILED
    record and ``info`` (the gate's error and tolerance)."""

    check = verify_peer if is_peer(p["mechanism"]) else verify  # peer:NAME: its own limit
    n = min(p["N"], GATE_MAX_N)
    res = check(p["mechanism"], n=n, head_dim=p["head_dim"], num_heads=min(p["heads"], 2),
                batch=1, dtype=dtype, causal=p["causal"], device=p["device"],
                **layouts.resolve(p["mechanism"], p["hparams"], n))
    info = {"gate_error": res.error, "gate_tol": res.tol}
    if res.ok:
        return None, info
    return {"status": "FAILED", "message": f"correctness gate: {res.message or res.note}",
            **info}, info


def peak_bytes(step, device) -> int:
    """Bytes above the start that one ``step()`` peaks at on ``device`` (a name or a
    ``torch.device``): CUDA's allocator statistics, else the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    reset_peak_rss()
    base = rss_bytes()
    step()
    return max(0, peak_rss_bytes() - base)


def _build(p: dict, dtype: torch.dtype):
    """The mechanism as the point runs it, and its effective hyperparameters: the built
    module's ``hp`` (registry defaults and anything derived from ``max_seq_len`` filled
    in), or a peer's validated over its defaults. A named block layout (``band:1``,
    :mod:`attnlab.bench.layouts`) is built for the point's N and kept by its name."""
    N, D, H, device = p["N"], p["head_dim"], p["heads"], p["device"]
    if peers.is_peer(p["mechanism"]):  # a PyPI peer, called as mech(q, k, v, is_causal=)
        mech = peers.build(p["mechanism"], p["hparams"], n=N, head_dim=D, num_heads=H,
                           device=device, dtype=dtype)
        return mech, peers.validate_hparams(p["mechanism"], dict(p["hparams"]))
    mech = create_for(p["mechanism"], head_dim=D, num_heads=H, max_seq_len=N,
                      **layouts.resolve(p["mechanism"], p["hparams"], N))
    mech = mech.to(device=device, dtype=dtype).eval()
    hp = dict(mech.hp)
    if isinstance(p["hparams"].get("layout"), str):  # a named layout: stored by its name
        hp["layout"] = p["hparams"]["layout"]
    return mech, hp


def resolved_hparams(mech, hp: dict, n: int, q, k, v) -> dict:
    """``hp`` with the values decided at call time filled in: a ``None`` or ``"auto"``
    hyperparameter whose module has a ``<name>_for`` method taking ``n`` or ``(q, k, v)``
    gets what that method says this call uses (``stride_for(n)``, ``backend_for(q, k,
    v)``). Anything else is kept as built."""
    out = dict(hp)
    for key, value in hp.items():
        decide = getattr(mech, f"{key}_for", None)
        if not (value is None or value == "auto") or not callable(decide):
            continue
        try:
            first = next(iter(inspect.signature(decide).parameters), None)
            if first == "n":
                out[key] = decide(n)
            elif first == "q":
                out[key] = decide(q, k, v)
        except (TypeError, ValueError, RuntimeError):
            pass  # only the row's description: the timed call itself reports a real problem
    return out


def _jsonable(hp: dict) -> dict:
    # A value JSON cannot hold (a dtype, a tensor) is stored as its text: the row shows
    # what was used, and the store never fails on it.
    return json.loads(json.dumps(hp, sort_keys=True, default=str))


def count_flops(p: dict, hparams: dict, step) -> tuple[float, str]:
    """The point's FLOPs and how they were counted: ``analytic:MODEL`` from the registry's
    FLOP model when the mechanism has one (the work it needs), else ``FlopCounterMode``
    around one ``step()`` (the matmuls it runs)."""
    model = None if peers.is_peer(p["mechanism"]) else get(p["mechanism"]).flops
    if model is None:
        with FlopCounterMode(display=False) as counter:
            step()
        return float(counter.get_total_flops()), "FlopCounterMode"
    D = p["head_dim"]
    flops = model(B=p["batch"], H=p["heads"], Nq=p["N"], Nk=p["N"], D=D, Dv=D,
                  causal=p["causal"], pass_=p["pass_"], hparams=hparams)
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or \
            not math.isfinite(flops) or flops < 0:
        raise ValueError(f"{p['mechanism']}: its FLOP model {model_name(model)} returned "
                         f"{flops!r}; expected a finite number >= 0")
    return float(flops), f"analytic:{model_name(model)}"


def measure_point(p: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Measure point ``p`` (a :class:`~attnlab.bench.grid.Point` as a dict, ``hparams`` a
    dict); ``cfg`` holds ``threads``, ``min_run_time``, ``error_max_n`` and ``gate``."""
    torch.set_num_threads(cfg["threads"])
    dtype, device = getattr(torch, p["dtype"]), p["device"]
    out: dict[str, Any] = {}
    if cfg.get("gate", True):
        failed, info = _gate(p, dtype)
        out.update(info)
        if failed is not None:
            return failed
    B, H, N, D = p["batch"], p["heads"], p["N"], p["head_dim"]
    mech, hparams = _build(p, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g, device=device, dtype=dtype)
               for _ in range(3))
    hparams = resolved_hparams(mech, hparams, N, q, k, v)
    out["effective_hparams"] = _jsonable(hparams)
    backward = p["pass_"] == "fwd+bwd"
    grad_out = torch.randn(B, H, N, D, generator=g, device=device, dtype=dtype)
    params = [t for t in mech.parameters() if t.requires_grad]
    if backward:
        for t in (q, k, v):
            t.requires_grad_()
    causal = p["causal"]

    def step():
        with torch.set_grad_enabled(backward):
            o = mech(q, k, v, is_causal=causal)
            if backward:
                o.backward(grad_out)
                for t in (q, k, v, *params):
                    t.grad = None
        return o

    out["peak_mem_bytes"] = peak_bytes(step, device)
    out["flops"], out["flops_method"] = count_flops(p, hparams, step)
    m = Timer("step()", globals={"step": step}, num_threads=cfg["threads"]).blocked_autorange(
        min_run_time=cfg["min_run_time"])
    out.update(time_s=m.median, time_iqr_s=m.iqr, runs=len(m.times) * m.number_per_run,
               timed_s=float(sum(m.raw_times)))
    if N <= cfg["error_max_n"]:
        with torch.no_grad():
            got = mech(q, k, v, is_causal=causal).double()
            exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                   is_causal=causal).double()
        out["error"] = float((got - exact).norm() / exact.norm().clamp_min(1e-300))
        if not torch.isfinite(got).all():
            return {"status": "error", "message": "non-finite output", **out}
    out["status"] = "ok"
    return out
