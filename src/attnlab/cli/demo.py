"""``attnlab demo``: run every registered mechanism once and tabulate the result.

This is a smoke run, not a benchmark (one call, no warm-up, no repeats): it shows that
each mechanism builds, runs forward and backward on the same input, and how far its
output is from exact attention. Timings worth quoting come from ``benchmarks/``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from attnlab.mechanisms.exact import softmax_attention
from attnlab.registry import create_for, get, list_mechanisms


@dataclass
class DemoRow:
    name: str
    family: str
    exact: bool
    params: int
    forward_ms: float
    backward_ms: float
    max_abs_err: float | None
    finite: bool
    error: str = ""


def _comparable(spec) -> bool:
    # Exact, parameter-free mechanisms compute softmax(QK^T*scale)V and must match it;
    # approximate ones estimate it, so their distance to it is the figure of interest.
    # Exact *learnable* ones (additive, general) define another score: nothing to compare.
    return not (spec.exact and spec.learnable)


def run_demo(batch: int = 2, heads: int = 4, n: int = 256, head_dim: int = 32,
             causal: bool = False, seed: int = 0, names: list[str] | None = None) -> list[DemoRow]:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, n, head_dim)
    q0, k0, v0 = (torch.randn(shape, generator=gen) for _ in range(3))
    scale = head_dim ** -0.5
    exact, _ = softmax_attention(q0.double(), k0.double(), v0.double(),
                                 torch.ones(n, n, dtype=torch.bool).tril() if causal else None,
                                 scale)
    rows = []
    for name in names or list_mechanisms():
        spec = get(name)
        try:
            torch.manual_seed(seed)
            mech = create_for(name, head_dim=head_dim, num_heads=heads, max_seq_len=n)
            q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
            t0 = time.perf_counter()
            out = mech(q, k, v, is_causal=causal and spec.causal, scale=scale)
            t1 = time.perf_counter()
            out.float().pow(2).mean().backward()
            t2 = time.perf_counter()
            err = (float((out.detach().double() - exact).abs().max())
                   if _comparable(spec) and (spec.causal or not causal) else None)
            rows.append(DemoRow(name, spec.family, spec.exact,
                                sum(p.numel() for p in mech.parameters()),
                                (t1 - t0) * 1e3, (t2 - t1) * 1e3, err,
                                bool(torch.isfinite(out).all())))
        except Exception as e:  # a demo reports a failure and goes on to the next one
            rows.append(DemoRow(name, spec.family, spec.exact, 0, float("nan"), float("nan"),
                                None, False, f"{type(e).__name__}: {e}"))
    return rows
