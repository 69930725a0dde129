"""The correctness gate: run a mechanism in its limit case and compare with float64.

A benchmark harness calls :func:`verify` before timing a mechanism: a mechanism that
fails is reported as FAILED and no speed is ever reported for it. Every registered
mechanism carries a :class:`~attnlab.registry.Limit`, the setting in which it is exact:

* approximations of softmax attention in the limit case of their paper (a window that
  covers the sequence, all tokens global, ``k = N`` identity projections, one LSH bucket,
  one landmark per token, span ``>= N``, many random features) against exact softmax
  attention ``softmax(q k^T / sqrt(D)) V``, computed here in float64;
* mechanisms that are not approximations of it (``linear``, ``cosformer``, ``additive``,
  synthesisers, ...) against an independent dense O(N^2) float64 formula of their paper
  (``Limit.reference``, written next to the mechanism, reading its learned parameters);
* exact mechanisms as they are, against softmax attention.

The mechanism is built with ``create_for(name, head_dim, num_heads, max_seq_len=n,
**{**hparams, **limit.hparams(n)})``: the user's (benchmark's) hyperparameters, with the
limit's overrides on top, so the code paths the benchmark runs (block sizes, chunk sizes,
hash rounds, backends) are the ones checked wherever the limit leaves them free.

Error metric: ``max |out - ref| / max(max |ref|, 1e-30)``, the largest deviation relative to
the largest reference entry (a max-norm relative error: entries near zero are not divided
by themselves, and one bad row is enough to fail). Tolerance per dtype: float32 ``tol``;
float64 ``max(tol * 1e-6, 1e-10)``; float16 ``max(tol, 2e-2)``; bfloat16 ``max(tol, 5e-2)``.
The floors leave room for mechanisms that round intermediate results to 11 or 8 bits: with
half-precision scores and weights (as ``reference`` and ``scaled_dot`` kept them before
they computed in float32), exact softmax attention reached relative errors of 1.7e-2 in
bfloat16 (D = 128, N = 512, 30 seeds), too close to 2e-2 for a gate that must never fail
a correct mechanism. A statistical limit (``Limit.statistical``, the
Performer's Monte Carlo error) keeps ``tol`` in float64 too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from attnlab import registry
from attnlab.contract import HALF_DTYPES
from attnlab.util.checks import check_int

__all__ = ["VerifyResult", "causal_allowed", "check_sizes", "dense_softmax_f64",
           "naive_attention_f64", "param_f64", "tolerance", "verify", "verify_all"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TINY = 1e-30


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`. ``error`` is ``inf`` when no comparison could be made
    (the mechanism raised, or returned NaN/inf or the wrong shape); ``message`` says why."""

    name: str
    ok: bool
    error: float
    tol: float
    note: str
    message: str


# ---------------------------------------------------------------- float64 references
def dense_softmax_f64(scores: torch.Tensor, v: torch.Tensor,
                      allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(scores) v`` in float64 over the last dim, only where ``allowed`` (bool,
    broadcastable); a row with no allowed key gives zeros. Written with explicit
    exp / sum, sharing no code with the mechanisms."""
    s = scores.double()
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
    row_max = s.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), 0.0, row_max)
    e = torch.exp(s - row_max)
    z = e.sum(dim=-1, keepdim=True)
    p = torch.where(z > 0, e / torch.where(z > 0, z, 1.0), 0.0)
    return p @ v.double()


def param_f64(p: torch.Tensor) -> torch.Tensor:
    """A mechanism's parameter or buffer as a detached float64 CPU tensor (references run
    on the CPU in float64, whatever device the mechanism ran on)."""
    return p.detach().to("cpu", torch.float64)


def causal_allowed(nq: int, nk: int, device=None) -> torch.Tensor:
    """``(nq, nk)`` bool, True where key ``j <= i`` (top-left aligned)."""
    i = torch.arange(nq, device=device).unsqueeze(1)
    j = torch.arange(nk, device=device).unsqueeze(0)
    return j <= i


def naive_attention_f64(q, k, v, *, mech=None, scale=None, is_causal=False) -> torch.Tensor:
    """Exact softmax attention ``softmax(q k^T * scale) V`` in float64, ``scale = 1/sqrt(D)``
    by default: the reference of every ``Limit`` without one of its own (``mech`` unused)."""
    q, k = q.double(), k.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = causal_allowed(q.shape[-2], k.shape[-2], q.device) if is_causal else None
    return dense_softmax_f64(q @ k.transpose(-2, -1) * scale, v, allowed)


# ---------------------------------------------------------------- the gate
def tolerance(limit: registry.Limit, dtype: torch.dtype) -> float:
    """Relative error allowed for ``limit`` in ``dtype`` (see the module docstring)."""
    if dtype == torch.float64:
        return limit.tol if limit.statistical else max(limit.tol * 1e-6, 1e-10)
    if dtype == torch.bfloat16:
        return max(limit.tol, 5e-2)
    if dtype == torch.float16:
        return max(limit.tol, 2e-2)
    return limit.tol


def check_sizes(caller: str, **sizes) -> None:
    """Each size an int >= 1 (bool is not), else ``ValueError`` naming it."""
    for arg, value in sizes.items():
        try:
            check_int(arg, value, low=1, who=caller)
        except (TypeError, ValueError):  # one exception type for every bad size, documented
            raise ValueError(f"{caller}: {arg} must be an int >= 1; got {value!r}") from None


def _check_args(spec, n, head_dim, num_heads, batch, dtype, causal, hparams) -> None:
    check_sizes("verify", n=n, head_dim=head_dim, num_heads=num_heads, batch=batch)
    if dtype not in _DTYPES:
        raise TypeError(f"verify: dtype must be one of {[str(d) for d in _DTYPES]}; got {dtype!r}")
    if dtype in HALF_DTYPES and not spec.half_precision:
        raise TypeError(f"verify: {spec.name} does not support {dtype} (half_precision=False); "
                        f"use float32 or float64")
    if not isinstance(causal, bool):
        raise TypeError(f"verify: causal must be a bool; got {type(causal).__name__}")
    if causal and not spec.causal:
        raise ValueError(f"verify: {spec.name} has no causal form; causal=True is not supported")
    known = {h.name for h in spec.hparams}
    unknown = sorted(set(hparams) - known)
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise TypeError(f"verify: {spec.name} has no hyperparameter {names}; accepted: "
                        f"{', '.join(sorted(known)) or 'none'}")


def _draw(limit, batch, num_heads, n, head_dim, dtype, seed):
    """Seeded standard normal ``q, k, v`` in float64 (reshaped by ``limit.inputs`` if any),
    rounded to ``dtype``: the mechanism gets these, the reference their exact float64 values."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, num_heads, n, head_dim, generator=gen, dtype=torch.float64)
               for _ in range(3))
    if limit.inputs is not None:
        q, k, v = limit.inputs(q, k, v, gen)
    return tuple(t.to(dtype) for t in (q, k, v))


def judge(out, ref: torch.Tensor, dtype: torch.dtype, tol: float) -> tuple[bool, float, str]:
    """``(ok, error, message)`` for output ``out`` against the float64 ``ref``: wrong type,
    shape or dtype and NaN/inf fail with ``error = inf``; else ``error`` is
    ``max|out - ref| / max|ref|`` and must be ``<= tol``."""
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return False, math.inf, f"output shape {got}, expected {tuple(ref.shape)}"
    if out.dtype != dtype:
        return False, math.inf, f"output dtype {out.dtype}, expected {dtype}"
    out = out.detach().to("cpu", torch.float64)
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).sum())
        return False, math.inf, f"output has {bad} NaN/inf entries"
    error = float((out - ref).abs().max() / max(float(ref.abs().max()), _TINY))
    ok = error <= tol
    return ok, error, f"error {error:.2e} {'<=' if ok else '>'} tol {tol:.1e}"


def verify(name: str, *, n: int = 64, head_dim: int = 16, num_heads: int = 2, batch: int = 2,
           dtype: torch.dtype = torch.float32, causal: bool = False, device="cpu", seed: int = 0,
           **hparams) -> VerifyResult:
    """Check mechanism ``name`` in its limit case on ``(batch, num_heads, n, head_dim)`` inputs.

    ``hparams`` are the caller's (benchmark's) hyperparameters; the limit's overrides win;
    ``max_seq_len`` defaults to ``n``. ``seed`` draws the inputs and the parameters, and is
    the mechanism's own ``seed`` hyperparameter where it has one (bigbird, performer,
    reformer), since a keyword cannot be both.
    Bad arguments raise (an unknown name: ``ValueError`` with close matches; ``causal=True``
    for a mechanism without a causal form: ``ValueError``; half precision where the
    mechanism has none, or an unknown hyperparameter: ``TypeError``). Anything that goes
    wrong *in the mechanism* (an exception, NaN/inf, a wrong shape or dtype) gives
    ``ok=False`` with the reason in ``message``: the gate never crashes its caller. The
    global RNG is left as it was (parameters are drawn under a fork seeded with ``seed``).
    """
    spec = registry.get(name)
    limit = spec.limit
    if limit is None:
        raise ValueError(f"verify: {spec.name} has no limit case; register it with "
                         f"limit=Limit(...) (see attnlab.registry.Limit)")
    _check_args(spec, n, head_dim, num_heads, batch, dtype, causal, hparams)
    tol = tolerance(limit, dtype)

    def result(ok: bool, error: float, message: str) -> VerifyResult:
        return VerifyResult(spec.name, ok, error, tol, limit.note, message)

    if limit.gate is not None:  # outside the (q, k, v) contract: the mechanism's own check
        try:
            out, ref = limit.gate(spec, n=n, head_dim=head_dim, num_heads=num_heads,
                                  batch=batch, dtype=dtype, causal=causal, device=device,
                                  seed=seed, hparams=dict(hparams))
        except Exception as e:  # noqa: BLE001  (as below: the gate reports)
            return result(False, math.inf, f"raised {type(e).__name__}: {e}")
        return result(*judge(out, ref, dtype, tol))
    try:
        q, k, v = _draw(limit, batch, num_heads, n, head_dim, dtype, seed)
        hp = {**hparams, **limit.hparams(n)}
        if "seed" in {h.name for h in spec.hparams}:
            hp.setdefault("seed", seed)
        max_seq_len = hp.pop("max_seq_len", n)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            mech = registry.create_for(spec.name, head_dim=head_dim, num_heads=num_heads,
                                       max_seq_len=max_seq_len, **hp)
            mech = mech.to(device).eval()
            out = mech(q.to(device), k.to(device), v.to(device), is_causal=causal)
        reference = limit.reference or naive_attention_f64
        ref = reference(q.double(), k.double(), v.double(), mech=mech, scale=None,
                        is_causal=causal)
    except Exception as e:  # noqa: BLE001  (the gate reports, it never crashes the harness)
        return result(False, math.inf, f"raised {type(e).__name__}: {e}")
    return result(*judge(out, ref, dtype, tol))


def verify_all(hparams: Mapping[str, dict] | None = None, **kw) -> list[VerifyResult]:
    """:func:`verify` for every registered mechanism, in ``list_mechanisms(inputs=None)``
    order (those outside the (q, k, v) contract through their limit's ``gate``).

    ``kw`` are verify's options (``n``, ``head_dim``, ``dtype``, ``causal``, ...), the same
    for all; ``hparams`` maps a mechanism name to its own hyperparameters. Mechanisms that
    cannot run the request at all (``causal=True`` without a causal form, half precision
    without support) are left out rather than failed.
    """
    hparams = dict(hparams or {})
    unknown = sorted(set(hparams) - set(registry.list_mechanisms(inputs=None)))
    if unknown:
        raise ValueError(f"verify_all: hparams for unknown mechanisms {unknown}")
    causal, dtype = kw.get("causal", False), kw.get("dtype", torch.float32)
    results = []
    for name in registry.list_mechanisms(inputs=None):
        spec = registry.get(name)
        if (causal and not spec.causal) or (dtype in HALF_DTYPES and not spec.half_precision):
            continue
        results.append(verify(name, **kw, **hparams.get(name, {})))
    return results
