"""FAVOR+ features (the Performer of :mod:`attnlab.mechanisms.kernel`) and their units.

``phi(x) = exp(w_i^T x - |x|^2 / 2)_i / sqrt(m)`` overflows for large ``w^T x``, so every
``exp`` argument is shifted by a constant that cancels in ``O_i = phi(q_i)^T S /
phi(q_i)^T z``: per query row its own max ``a_i``; for keys the global max ``s``
(non-causal) or, causally, the running max ``m_j`` over keys ``j' <= j`` (a global max
would let future keys change past outputs). The engines
(:mod:`~attnlab.mechanisms._engines.kernel_causal`, ``kernel_decode``) then hold row ``i``'s
denominator in units of ``exp(-u_i)``, ``u_i = a_i + s`` or ``a_i + m_i``, the row's
*log-units*. The floor ``eps`` is meant for the true denominator ``phi(q_i)^T z_i``, so the
engines compare with ``eps exp(-u_i)`` (:func:`row_floor`): a floor of ``eps`` in shifted
units silently scaled down rows whose true denominator was ``1e-3 .. 0.3`` once the shifts
passed ~20 (D = 256: errors of 0.19, causally 2.2, against the plain estimator).

What the maxima are taken of: with ``kernel_eps > 0`` of ``w^T x`` alone, as the reference
code (performer-pytorch), since ``kernel_eps`` is added to the *shifted* features and the
shift is then part of the estimator; with ``kernel_eps = 0`` (the plain, unbiased estimator,
where the shift only cancels) of the whole exponent ``w^T x - |x|^2 / 2``, so that each
row's largest feature is 1 and peaked inputs (``|x|^2 / 2`` past 87) do not underflow to an
all-zero row in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnlab import registry
from attnlab.contract import work_dtype
from attnlab.mechanisms._engines.kernel_decode import check_state, decode_kernel
from attnlab.mechanisms.base import head_slices
from attnlab.registry import Limit
from attnlab.verify import causal_allowed, naive_attention_f64, param_f64, tolerance

__all__ = ["decode_favor", "favor_features", "orthogonal_gaussian", "peaked_inputs",
           "performer_gate", "performer_limit_inputs", "performer_reference", "row_floor"]


def orthogonal_gaussian(m: int, d: int, generator=None) -> torch.Tensor:
    """``(m, d)`` FAVOR+ projection: stacked ``d x d`` blocks of orthogonal rows, each row's
    norm resampled from the chi(d) law of a Gaussian vector's norm (as performer-pytorch)."""
    g = torch.randn(-(-m // d), d, d, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(g)  # one batched QR; R's diagonal signs make Q Haar-uniform
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)
    rows = Q.transpose(-2, -1).reshape(-1, d)[:m]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)
    return (rows * norms.unsqueeze(1)).float()


def favor_features(q, k, projection, scale, kernel_eps, is_causal, keep=None, run_from=None):
    """``(phi_q, phi_k, log_scale, log_units)`` for work-dtype ``q, k`` ``(B, H, N, D)``.

    ``log_scale`` ``(B, H, Nk)`` (causal, else None) is the running max divided out of
    ``phi_k`` row by row; ``log_units`` ``(B, H, Nq, 1)`` the log-units of each query row
    (module docstring). ``keep`` ``(B, H, Nk)`` marks the real keys (maxima over them only,
    padded rows zero); ``run_from`` ``(B, H)`` continues a decoding state's running max.
    """
    m = projection.shape[0]
    # x scaled by scale^(1/2) is folded into w (an (m, D) matrix, not an (N, D) copy).
    w = projection.to(device=q.device, dtype=q.dtype) * math.sqrt(scale)
    log_norm = -0.5 * math.log(m)  # 1/sqrt(m), inside the exp
    c = kernel_eps * math.exp(log_norm)

    def parts(x):  # (w_i^T x - |x|^2 / 2, and what the shift is the max of)
        wx = x @ w.T
        arg = wx - (0.5 * scale) * (x * x).sum(dim=-1, keepdim=True)
        return arg, (wx if c else arg).detach()

    (arg_q, of_q), (arg_k, of_k) = parts(q), parts(k)
    a = of_q.amax(dim=-1, keepdim=True)                                  # (B, H, Nq, 1)
    phi_q = (arg_q - (a - log_norm)).exp() + c
    row_max = of_k.amax(dim=-1)                                          # (B, H, Nk)
    if keep is not None:  # maxima over real keys only: padding must not move them
        row_max = row_max.masked_fill(~keep, -math.inf)
    if not is_causal:
        shift = row_max.amax(dim=-1, keepdim=True)
        shift = shift.masked_fill(torch.isneginf(shift), 0.0).unsqueeze(-1)  # no real key
        return phi_q, _keys(arg_k, shift, log_norm, keep).exp() + c, None, a + shift
    run_max = row_max.cummax(dim=-1).values
    if run_from is not None:  # decoding: the running max over the keys before these
        run_max = torch.maximum(run_max, run_from.unsqueeze(-1))
    if keep is not None:
        # Keys before the first real one have no running max yet: they take the first
        # real key's (any value <= it keeps run_max non-decreasing; their rows are zeroed).
        first = run_max.masked_fill(torch.isneginf(run_max), math.inf).amin(-1, keepdim=True)
        run_max = torch.where(torch.isneginf(run_max), first.nan_to_num(posinf=0.0), run_max)
    phi_k = _keys(arg_k, run_max.unsqueeze(-1), log_norm, keep).exp() + c
    return phi_q, phi_k, run_max, a + _row_scale(run_max, q.shape[-2]).unsqueeze(-1)


def _keys(arg, shift, log_norm, keep):
    """Key exponents; padded rows ``-inf`` (their exponent is relative to real keys)."""
    arg = arg - (shift - log_norm)
    return arg if keep is None else arg.masked_fill(~keep.unsqueeze(-1), -math.inf)


def _row_scale(run_max, nq: int):
    """The running max the causal engine holds query row ``i`` in (``(B, H, Nq)``): key
    ``i``'s, the last key's for rows past the last key (as kernel_attention pads)."""
    nk = run_max.shape[-1]
    return run_max[..., :nq] if nk >= nq else F.pad(run_max, (0, nq - nk), "replicate")


def row_floor(eps: float, log_units: torch.Tensor) -> torch.Tensor:
    """``eps exp(-u_i)``: the floor ``eps`` of the true denominator, in each row's units;
    at least the dtype's smallest normal, so that an empty row (no real key) gives 0."""
    tiny = torch.finfo(log_units.dtype).tiny
    return (math.log(eps) - log_units).exp().clamp_min(tiny)


def decode_favor(mech, q, k, v, state, scale: float):
    """``Mechanism._decode`` of the Performer: ``kernel_decode``'s ``decode_kernel`` a few
    heads at a time (as the forward), floored per row as the causal forward is; the state
    in the work dtype, ``out`` in the inputs'."""
    if mech.hp["redraw"] and mech.training:  # fresh features per call
        raise ValueError(f"{mech.spec.name}.decode: redraw=True in training mode draws new "
                         f"features at every call, not those the state was built with; "
                         f"decode in eval mode (.eval()) or with redraw=False")
    B, H, n, _ = q.shape
    dtype, work = q.dtype, work_dtype(q.dtype)
    q, k, v = q.to(work), k.to(work), v.to(work)
    m, eps = mech.hp["num_features"], mech.hp["eps"]
    check_state(mech.spec.name, state, (B, H, m, v.shape[-1]), work, q.device, True)
    outs, states = [], []
    for s in head_slices(B, H, n * m):
        sub = None if state is None else {key: x if key == "t" else x[:, s]
                                          for key, x in state.items()}
        run_from = None if sub is None else sub["log_scale"]
        phi_q, phi_k, log_scale, units = favor_features(
            q[:, s], k[:, s], mech.projection, scale, mech.hp["kernel_eps"], True,
            run_from=run_from)
        out, new = decode_kernel(phi_q, phi_k, v[:, s], sub, eps=row_floor(eps, units),
                                 chunk_size=mech.hp["chunk_size"], log_scale=log_scale)
        outs.append(out)
        states.append(new)
    joined = {key: torch.cat([st[key] for st in states], dim=1) for key in states[0]
              if key != "t"}
    return torch.cat(outs, dim=1).to(dtype), {**joined, "t": states[0]["t"]}


# ---------------------------------------------------------------- the correctness gate
def performer_limit_inputs(q, k, v, gen):
    """Inputs on which FAVOR+ with many features is close to softmax, and still telling.

    The estimator's relative variance per feature is ``exp(|x_q + x_k|^2) - 1`` with
    ``x = q (1/sqrt(D))^(1/2)`` (Choromanski et al., Lemma 2), so ``|x| <= 0.8`` keeps it
    below ``exp(2.56) - 1`` for every pair. Independent directions in ``D`` dimensions
    would give logits ``x_q . x_k`` of only ``|x|^2 / sqrt(D)`` (nearly uniform weights, where
    a wrong scale hardly shows), so q and k lie in one random 4-dimensional subspace: the
    logits spread over ``+-|x|^2``. Norms vary over ``[0.2, 0.8]`` so that the ``|x|^2 / 2``
    normalisation matters. ``v`` is left as drawn.
    """
    d = q.shape[-1]
    r = min(4, d)
    basis = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))[0].T

    def shaped(x):
        u = x[..., :r] / x[..., :r].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        norm = 0.2 + 0.6 * torch.rand(*x.shape[:-1], 1, generator=gen, dtype=torch.float64)
        return (u * norm) @ basis * d ** 0.25  # |x| = norm once scaled by (1/sqrt(D))^(1/2)

    return shaped(q), shaped(k), v


def peaked_inputs(q, k, v, gen):
    """Standard-normal rows, those of ``q`` and ``k`` scaled by factors in ``[1, 4]``: peaked
    softmax rows and FAVOR+ shifts of tens, where a floor in shifted units shows."""
    def grown(x):
        return x * (1.0 + 3.0 * torch.rand(*x.shape[:-1], 1, generator=gen, dtype=x.dtype))
    return grown(q), grown(k), v


def performer_reference(q, k, v, *, mech, scale, is_causal):
    """Its own equation in float64, ``kernel_eps = 0``: ``A = phi(q) phi(k)^T`` with
    ``phi(x) = exp(W x - |x|^2/2) / sqrt(m)``, ``x = x scale^(1/2)``, ``W`` its ``projection``."""
    W = param_f64(mech.projection)
    s = q.shape[-1] ** -0.5 if scale is None else scale

    def phi(x):
        x = x * math.sqrt(s)
        return torch.exp(x @ W.T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(W.shape[0])

    A = phi(q) @ phi(k).transpose(-2, -1)
    if is_causal:
        A = A * causal_allowed(A.shape[-2], A.shape[-1])
    return (A @ v) / A.sum(dim=-1, keepdim=True).clamp_min(mech.hp["eps"])


def performer_gate(spec, *, n, head_dim, num_heads, batch, dtype, causal, device, seed,
                   hparams):
    """Two checks, judged as one (``Limit.gate``): (a) 8192 plain features on
    :func:`performer_limit_inputs` against softmax (Monte Carlo error, ``tol``); (b) the
    benchmark's features, ``kernel_eps = 0``, on :func:`peaked_inputs` against its own
    equation (:func:`performer_reference`), whose error is scaled by ``tol / t_b`` (``t_b``
    a deterministic limit's tolerance in ``dtype``, 1e-4 in float32) so that ``tol`` judges
    both. Each part is divided by its ``max |ref|``; ``out`` returns in ``dtype``."""
    tol = spec.limit.tol
    t_b = tolerance(Limit(hparams=lambda n: {}, note=""), dtype)
    outs, refs = [], []
    for part, (inputs, over, reference) in enumerate([
            (performer_limit_inputs, {"num_features": 8192}, naive_attention_f64),
            (peaked_inputs, {}, performer_reference)]):
        gen = torch.Generator().manual_seed(seed + part)
        q, k, v = inputs(*(torch.randn(batch, num_heads, n, head_dim, generator=gen,
                                       dtype=torch.float64) for _ in range(3)), gen)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        hp = {"seed": seed, "max_seq_len": n, **hparams, **over, "kernel_eps": 0.0}
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            mech = registry.create_for(spec.name, head_dim=head_dim, num_heads=num_heads, **hp)
            out = mech.to(device).eval()(q.to(device), k.to(device), v.to(device),
                                         is_causal=causal)
        if out.dtype != dtype:
            raise TypeError(f"output dtype {out.dtype}, expected {dtype}")
        ref = reference(q.double(), k.double(), v.double(), mech=mech, scale=None,
                        is_causal=causal)
        out = out.detach().to("cpu", torch.float64)
        if part:
            out = ref + (out - ref) * (tol / t_b)
        top = float(ref.abs().max()) or 1.0
        outs.append(out / top)
        refs.append(ref / top)
    return torch.cat(outs, dim=2).to(dtype), torch.cat(refs, dim=2)
