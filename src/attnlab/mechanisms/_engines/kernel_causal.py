"""The computational core of kernel attention (:mod:`attnlab.mechanisms.kernel`).

:func:`kernel_attention` turns precomputed features into outputs,
``O_i = phi(q_i)^T S / max(phi(q_i)^T z, eps)``. Non-causally ``S = sum_j phi(K_j) V_j^T``
and ``z = sum_j phi(K_j)`` are two matrix products. Causally they are prefix sums, taken
chunk by chunk (``chunk_size`` rows ``c``): inside a chunk the masked quadratic form
``tril(phi(Q_c) phi(K_c)^T) V_c``, across chunks a running state ``S, z``, so nothing of
size ``(N, F, Dv)`` is materialised. The backward pass is three more runs of the same loop
(on flipped sequences for ``dK`` and ``dV``): autograd keeps only ``phi(Q), phi(K), V``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["kernel_attention"]


def _causal_chunks(a, b, v, m, chunk):
    """``Y_i = sum_{j<=i} (a_i . b_j) exp(m_j - m_i) v_j`` over ``(BH, N, *)`` tensors.

    ``m`` (``(BH, N)``, non-decreasing along N, or None for 0) is a log-scale the caller
    divided out of ``b`` (``b_j = phi_j exp(-m_j)``) to keep ``exp`` finite; every factor
    ``exp(m_j - m_i)`` with ``j <= i`` is ``<= 1``. The running state ``S`` is held in the
    scale of the last row of the previous chunk.
    """
    BH, N, _ = a.shape
    y = a.new_empty(BH, N, v.shape[-1])
    S = a.new_zeros(BH, a.shape[-1], v.shape[-1])
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=a.device).triu_(1)
    for i0 in range(0, N, chunk):
        i1 = min(i0 + chunk, N)
        a_c, b_c, v_c, fut = a[:, i0:i1], b[:, i0:i1], v[:, i0:i1], upper[: i1 - i0, : i1 - i0]
        W = torch.bmm(a_c, b_c.transpose(1, 2))                      # (BH, c, c)
        if m is None:
            W.masked_fill_(fut, 0.0)
            y_c = torch.bmm(a_c, S)
            S.baddbmm_(b_c.transpose(1, 2), v_c)
        else:
            m_c = m[:, i0:i1]
            m_prev = m[:, i0 - 1: i0] if i0 > 0 else m_c[:, :1]      # scale S is held in
            W.mul_((m_c.unsqueeze(1) - m_c.unsqueeze(2)).masked_fill_(fut, -math.inf).exp_())
            y_c = torch.bmm(a_c * (m_prev - m_c).exp().unsqueeze(-1), S)
            m_last = m_c[:, -1:]
            S.mul_((m_prev - m_last).exp().unsqueeze(-1))
            S.baddbmm_((b_c * (m_c - m_last).exp().unsqueeze(-1)).transpose(1, 2), v_c)
        y[:, i0:i1] = y_c.baddbmm_(W, v_c)
    return y


def _flip(t):
    return t.flip(1)


class _CausalKernel(torch.autograd.Function):
    """Differentiable :func:`_causal_chunks`; ``m`` is a constant (it cancels in O_i)."""

    @staticmethod
    def forward(ctx, a, b, v, m, chunk):
        ctx.save_for_backward(a, b, v, m)
        ctx.chunk = chunk
        return _causal_chunks(a, b, v, m, chunk)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        a, b, v, m = ctx.saved_tensors
        c = ctx.chunk
        # dA_i = sum_{j<=i} g_ij (dY_i . v_j) b_j: the same causal form with (dY, V, B).
        # dB_j and dV_j sum over i >= j: causal on the reversed sequence, where -m flipped
        # is again non-decreasing and g_ij = exp(m_j - m_i) keeps its form.
        mr = None if m is None else _flip(-m)
        da = _causal_chunks(dy, v, b, m, c) if ctx.needs_input_grad[0] else None
        db = dv = None
        if ctx.needs_input_grad[1]:
            db = _flip(_causal_chunks(_flip(v), _flip(dy), _flip(a), mr, c))
        if ctx.needs_input_grad[2]:
            dv = _flip(_causal_chunks(_flip(b), _flip(a), _flip(dy), mr, c))
        return da, db, dv, None, None


def kernel_attention(phi_q, phi_k, v, is_causal=False, eps=1e-6, chunk_size=64, log_scale=None):
    """``O_i = phi(q_i)^T S / max(phi(q_i)^T z, eps)`` from precomputed features.

    ``phi_q`` ``(B, H, Nq, F)``, ``phi_k`` ``(B, H, Nk, F)``, ``v`` ``(B, H, Nk, Dv)``.
    ``log_scale`` (causal only, ``(B, H, Nk)`` non-decreasing): ``phi_k`` was divided by
    ``exp(log_scale)`` row by row (see :func:`_causal_chunks`).
    """
    B, H, Nq, Fdim = phi_q.shape
    Nk, Dv = phi_k.shape[2], v.shape[-1]
    if not is_causal:
        kv = phi_k.transpose(-2, -1) @ v                             # S: (B, H, F, Dv)
        num = phi_q @ kv
        den = phi_q @ phi_k.sum(dim=-2).unsqueeze(-1)                # phi(q).z
        return num / den.clamp_min(eps)
    if Nk > Nq:  # top-left aligned: keys past the last query are never attended
        phi_k, v = phi_k[:, :, :Nq], v[:, :, :Nq]
        log_scale = None if log_scale is None else log_scale[..., :Nq]
    elif Nk < Nq:  # queries past the last key see every key: zero features add nothing
        phi_k = F.pad(phi_k, (0, 0, 0, Nq - Nk))
        v = F.pad(v, (0, 0, 0, Nq - Nk))
        log_scale = None if log_scale is None else F.pad(log_scale, (0, Nq - Nk), "replicate")
    # A column of ones appended to V carries the denominator through the same loop.
    v1 = torch.cat([v, v.new_ones(B, H, Nq, 1)], dim=-1)
    m = None if log_scale is None else log_scale.reshape(B * H, Nq).detach()
    y = _CausalKernel.apply(phi_q.reshape(B * H, Nq, Fdim), phi_k.reshape(B * H, Nq, Fdim),
                            v1.reshape(B * H, Nq, Dv + 1), m, chunk_size)
    y = y.view(B, H, Nq, Dv + 1)
    return y[..., :Dv] / y[..., Dv:].clamp_min(eps)
