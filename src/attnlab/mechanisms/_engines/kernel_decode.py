"""Decoding kernel attention with its recurrent state (:mod:`attnlab.mechanisms.kernel`).

Causal kernel attention is an RNN (Katharopoulos et al. 2020, eq. 16-20): after ``t``
positions everything the future needs is

.. math::

    S_t = \\sum_{j<t} \\phi(K_j) V_j^\\top \\ (F \\times D_v), \\qquad
    z_t = \\sum_{j<t} \\phi(K_j) \\ (F), \\qquad
    O_i = \\frac{\\phi(Q_i)^\\top S_{i+1}}{\\max(\\phi(Q_i)^\\top z_{i+1}, \\varepsilon)}

whose size does not grow with ``t``. :func:`decode_kernel` continues a state over ``n``
new positions ``t .. t+n-1`` chunk by chunk, as the causal forward
(:mod:`~attnlab.mechanisms._engines.kernel_causal`) does: inside a chunk the masked
``c x c`` form, across chunks the state, so a prefill of ``n`` tokens costs ``O(n (c + F)
Dv)`` and never an ``n x n`` tensor; it returns the final state.

**Log-scaled keys** (the Performer): the causal forward divides key ``j``'s features by
``exp(m_j)``, ``m_j`` the running max of its keys, non-decreasing; rows are then in units of
``exp(m_i)``, and so is the ``eps`` floor. The state keeps ``S, z`` in units of
``exp(M_t)``, ``M_t = m_{t-1}``, with ``M_t`` itself (``"log_scale"``): a new position first
rescales them by ``exp(M_t - m_i) <= 1``. Every output then equals the full causal
forward's up to rounding, the floor included.

A state is a dict ``{"S": (B, H, F, Dv), "z": (B, H, F), "t": int}`` (plus ``"log_scale"``
``(B, H)`` for log-scaled keys), in the work dtype (float32 for half-precision inputs). The
state passed in is never modified.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from attnlab.contract import work_dtype
from attnlab.mechanisms._engines.decode_state import check_decode_state
from attnlab.mechanisms.base import head_slices

__all__ = ["check_positions", "check_state", "decode_by_heads", "decode_kernel",
           "decode_mechanism"]


def check_state(who: str, state, shape: tuple[int, int, int, int], dtype: torch.dtype,
                device: torch.device, log_scale: bool) -> None:
    """A ``ValueError``/``TypeError`` naming ``state`` unless it is ``None`` or a state of
    ``shape = (B, H, F, Dv)`` in ``dtype`` on ``device`` (with ``"log_scale"`` iff asked)."""
    B, H, F, Dv = shape
    expected = {"S": ((B, H, F, Dv), dtype), "z": ((B, H, F), dtype)}
    if log_scale:
        expected["log_scale"] = ((B, H), dtype)
    check_decode_state(who, state, expected, device, f"(B={B}, H={H}, F={F}, Dv={Dv})")


def _chunks(a, b, v1, S, m, m_prev, chunk):
    """``(y, S)``: ``y_i = a_i^T S_{i+1}`` for the new rows, ``S`` after the last one.

    ``a, b`` ``(BH, n, F)``, ``v1`` ``(BH, n, Dv + 1)`` (a column of ones: z rides in
    ``S``'s last column), ``S`` ``(BH, F, Dv + 1)`` in units of ``exp(m_prev)``; ``m``
    ``(BH, n)`` the running log-scale of the new rows (``None``: no scaling).
    """
    BH, n, _ = a.shape
    y = a.new_empty(BH, n, v1.shape[-1])
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=a.device).triu_(1)
    for i0 in range(0, n, chunk):
        i1 = min(i0 + chunk, n)
        a_c, b_c, v_c, fut = a[:, i0:i1], b[:, i0:i1], v1[:, i0:i1], upper[: i1 - i0, : i1 - i0]
        W = torch.bmm(a_c, b_c.transpose(1, 2))                      # (BH, c, c)
        if m is None:
            W = W.masked_fill(fut, 0.0)
            y_c = torch.bmm(a_c, S)
            S = S.baddbmm(b_c.transpose(1, 2), v_c)                   # a new S: never in place
        else:
            m_c = m[:, i0:i1]
            W = W * (m_c.unsqueeze(1) - m_c.unsqueeze(2)).masked_fill(fut, -math.inf).exp()
            y_c = torch.bmm(a_c * (m_prev - m_c).exp().unsqueeze(-1), S)
            m_last = m_c[:, -1:]
            S = S * (m_prev - m_last).exp().unsqueeze(-1)
            S = S.baddbmm((b_c * (m_c - m_last).exp().unsqueeze(-1)).transpose(1, 2), v_c)
            m_prev = m_last
        y[:, i0:i1] = y_c.baddbmm(W, v_c)
    return y, S


def decode_kernel(phi_q, phi_k, v, state, *, eps: float, chunk_size: int, log_scale=None):
    """``(out, new_state)`` for ``n`` new positions from their features.

    ``phi_q, phi_k`` ``(B, H, n, F)``, ``v`` ``(B, H, n, Dv)``, all in the state's dtype;
    ``log_scale`` ``(B, H, n)``: the running log-scale divided out of ``phi_k`` (it must
    continue the state's: ``>= state["log_scale"]``, non-decreasing), or ``None``.
    ``out_i = num_i / max(den_i, eps)``, the causal forward's floor.
    """
    B, H, n, Fdim = phi_q.shape
    Dv = v.shape[-1]
    v1 = torch.cat([v, v.new_ones(B, H, n, 1)], dim=-1).reshape(B * H, n, Dv + 1)
    if state is None:
        S, t = v1.new_zeros(B * H, Fdim, Dv + 1), 0
        m_prev = None if log_scale is None else log_scale[..., :1].reshape(B * H, 1)
    else:
        S = torch.cat([state["S"], state["z"].unsqueeze(-1)], dim=-1).reshape(B * H, Fdim,
                                                                                Dv + 1)
        t = state["t"]
        m_prev = None if log_scale is None else state["log_scale"].reshape(B * H, 1)
    m = None if log_scale is None else log_scale.reshape(B * H, n)
    y, S = _chunks(phi_q.reshape(B * H, n, Fdim), phi_k.reshape(B * H, n, Fdim), v1, S, m,
                   m_prev, chunk_size)
    y, S = y.view(B, H, n, Dv + 1), S.view(B, H, Fdim, Dv + 1)
    new = {"S": S[..., :Dv].contiguous(), "z": S[..., Dv].contiguous(), "t": t + n}
    if log_scale is not None:
        new["log_scale"] = log_scale[..., -1].contiguous()
    return y[..., :Dv] / y[..., Dv:].clamp_min(eps), new


def _heads_of(state, s: slice):
    if state is None or s == slice(None):
        return state
    return {key: x if key == "t" else x[:, s] for key, x in state.items()}


def decode_by_heads(features: Callable, q, k, v, state, *, feature_size: int, eps: float,
                    chunk_size: int):
    """:func:`decode_kernel` a few heads at a time (heads are independent), as the forward
    does, so that a long prefill's ``(n, F)`` feature maps exist for one slice at a time.

    ``features(q, k, state)`` gives ``(phi_q, phi_k, log_scale or None)`` for a slice of
    heads of work-dtype inputs and that slice of the state (``None`` at ``t = 0``).
    """
    B, H, n, _ = q.shape
    outs, states = [], []
    for s in head_slices(B, H, n * feature_size):
        sub = _heads_of(state, s)
        qs, ks, vs = q[:, s], k[:, s], v[:, s]
        phi_q, phi_k, log_scale = features(qs, ks, sub)
        out, new = decode_kernel(phi_q, phi_k, vs, sub, eps=eps, chunk_size=chunk_size,
                                 log_scale=log_scale)
        outs.append(out)
        states.append(new)
    if len(outs) == 1:
        return outs[0], states[0]
    joined = {key: torch.cat([st[key] for st in states], dim=1) for key in states[0]
              if key != "t"}
    return torch.cat(outs, dim=1), {**joined, "t": states[0]["t"]}


def decode_mechanism(mech, q, k, v, state, scale: float):
    """``Mechanism._decode`` of a kernel mechanism (``attnlab.mechanisms.kernel``): inputs
    in its work dtype, its features from ``mech._decode_features(q, k, scale, state)``, its
    ``eps`` and ``chunk_size``; ``out`` in the inputs' dtype."""
    if mech.hp.get("redraw") and mech.training:  # the Performer's fresh features per call
        raise ValueError(f"{mech.spec.name}.decode: redraw=True in training mode draws new "
                         f"features at every call, not those the state was built with; "
                         f"decode in eval mode (.eval()) or with redraw=False")
    work, size = work_dtype(q.dtype), mech._feature_size(q.shape[-1])
    check_state(mech.spec.name, state, (*q.shape[:2], size, v.shape[-1]), work, q.device,
                mech._running_max)
    out, new = decode_by_heads(lambda q, k, st: mech._decode_features(q, k, scale, st),
                               q.to(work), k.to(work), v.to(work), state, feature_size=size,
                               eps=mech.hp["eps"], chunk_size=mech.hp["chunk_size"])
    return out.to(q.dtype), new


def check_positions(who: str, max_seq_len, t: int, n: int) -> None:
    """Position-weighted features (cosFormer's ``cos(pi/2 (i - j)/M)``) decode only with
    one ``M = max_seq_len`` for the whole sequence, and positions ``t .. t+n-1 < M``."""
    if max_seq_len is None:
        raise ValueError(f"{who}.decode: needs max_seq_len set (M of cos(pi/2 (i-j)/M) must "
                         f"not change as the sequence grows; without it M = the call's "
                         f"length); create it with max_seq_len=... (MultiheadAttention(..., "
                         f"max_seq_len=...) passes its own)")
    if t + n > max_seq_len:
        raise ValueError(f"{who}.decode: positions {t}..{t + n - 1} exceed max_seq_len="
                         f"{max_seq_len} (cos(pi/2 (i-j)/M) needs |i - j| < M)")
