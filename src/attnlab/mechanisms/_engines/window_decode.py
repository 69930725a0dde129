"""Decoding windowed attention with a rolling buffer of keys and values.

A causal windowed mechanism reads, in row ``i``, only keys within its span ``W`` of ``i``
(``i - W < j <= i``) and, for ``longformer``, the first ``P`` positions (its global
tokens). After ``t`` positions everything the future needs is therefore

.. math::

    \\mathcal{B}_t = \\{(j, k_j, v_j) : t - W < j < t,\\ j \\ge P\\} \\cup
                     \\{(j, k_j, v_j) : j < P,\\ j < t\\}

``W - 1 + P`` entries whatever ``t``: the state is that buffer, keys and values with their
absolute positions (``-1``: an empty slot), and the number of positions absorbed. Every
new query ``i`` (``t <= i < t + n``) attends the buffer and the new keys under the
mechanism's own pattern, ``allowed(i, j)`` and ``j <= i`` (``j`` absolute positions), with
the mechanism's own weights: a masked softmax of scores (a fully masked row gives zeros,
as the contract says), plus a bias for ``adaptive_span``'s soft mask, or a convolution's
taps by offset ``j - i``. So ``out`` equals rows ``t .. t+n-1`` of the full causal forward.

A long prefill runs in query chunks of ``c = max(W, MIN_CHUNK)`` rows; chunk ``[c0, c1)``
scores its ``P + (c1 - c0) + W - 1`` keys only, so ``n`` new positions cost ``O(n (W + P)
D)`` time and ``O(c (W + P))`` memory above the inputs: never an ``n x n`` tensor.

A state is ``{"k": (B, H, S, D), "v": (B, H, S, Dv), "pos": (S,) int64, "t": int}`` with
``S = P + W - 1`` slots (the pinned ones first); a mechanism that reads no keys (the
convolutions) keeps no ``"k"``. It is in the work dtype (float32 for half-precision
inputs) and the state passed in is never modified: a new dict is returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnlab.contract import masked_softmax, work_dtype
from attnlab.mechanisms._engines.decode_state import check_decode_state

__all__ = ["MIN_CHUNK", "Window", "check_window_state", "conv_weights", "decode_conv",
           "decode_softmax", "decode_window", "softmax_weights"]

MIN_CHUNK = 64  # query rows per chunk at least: fewer Python steps for short windows

# (q chunk, keys or None, query positions (c,), key positions (L,), ok (c, L)) -> (B, H, c, L)
Weights = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.Tensor,
                    torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Window:
    """A causal pattern with bounded reach.

    ``span`` ``W >= 1``: row ``i`` reads no key ``j <= i - W`` but the pinned ones (the
    buffer keeps ``W - 1``); ``pinned`` ``P``: positions ``0 .. P-1``, kept for good;
    ``reach`` (``<= W``, default ``W``): the keys this call reads, ``i - reach < j`` or
    ``j < P`` (``adaptive_span``'s current crop inside its ``max_span``); ``allowed(i, j)``
    (``None``: all of them) the pattern among those, on broadcasting int64 positions with
    ``0 <= j <= i``.
    """

    span: int
    allowed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    pinned: int = 0
    reach: int | None = None

    @property
    def slots(self) -> int:
        return self.pinned + self.span - 1


def check_window_state(who: str, state, win: Window, B: int, H: int, dims: dict,
                       dtype: torch.dtype, device: torch.device) -> None:
    """A ``TypeError``/``ValueError`` naming ``state`` unless it is ``None`` or a state of
    this window for these inputs; ``dims`` maps ``"k"``/``"v"`` to their last dims."""
    S = win.slots
    expected = {key: ((B, H, S, d), dtype) for key, d in dims.items()}
    expected["pos"] = ((S,), torch.int64)
    check_decode_state(who, state, expected, device,
                       f"(B={B}, H={H}, {S} slots = {win.pinned} pinned + span {win.span} - 1)")


def _pinned(old, new, pos, t: int, P: int):
    """The pinned slots ``0 .. P-1`` with the new positions ``t .. < P`` written in (a copy:
    the old state's tensor is never touched)."""
    m = min(P, t + new.shape[2])
    if t >= m:
        return old, pos
    old, pos = old.clone(), pos.clone()
    old[:, :, t:m] = new[:, :, :m - t]
    pos[t:m] = torch.arange(t, m, device=pos.device)
    return old, pos


def decode_window(who: str, win: Window, q, k, v, state, weights: Weights, *,
                  chunk: int | None = None):
    """``(out, new_state)`` for ``n`` new positions: ``out_i = sum_j A_ij v_j`` over the
    buffer and the new keys, ``A = weights(q_c, k_c, i, j, ok)`` per query chunk.

    ``q`` ``(B, H, n, .)`` is whatever per-query tensor ``weights`` reads (scaled queries,
    a convolution's taps), ``k`` ``(B, H, n, D)`` or ``None`` (no keys kept), ``v``
    ``(B, H, n, Dv)``, all in the state's dtype. ``ok`` (``(c, L)`` bool) already holds
    ``allowed``, causality and the empty slots.
    """
    B, H, n, Dv = v.shape
    P, R = win.pinned, win.span - 1
    rr = R if win.reach is None else min(win.reach, win.span) - 1
    dims = {"v": Dv} if k is None else {"k": k.shape[-1], "v": Dv}
    check_window_state(who, state, win, B, H, dims, v.dtype, v.device)
    new = {"v": v} if k is None else {"k": k, "v": v}
    if state is None:
        t = 0
        old = {key: v.new_zeros(B, H, win.slots, d) for key, d in dims.items()}
        old_pos = torch.full((win.slots,), -1, dtype=torch.int64, device=v.device)
    else:
        t, old, old_pos = state["t"], state, state["pos"]
    q_pos = torch.arange(t, t + n, device=v.device)
    pin = {}
    for key in new:  # "v" always: pin_pos is set
        pin[key], pin_pos = _pinned(old[key][:, :, :P], new[key], old_pos[:P], t, P)
    # The rolling part: positions t - R .. t + n - 1 (slot e is position t - R + e); those
    # below P live in the pinned slots, so they are empty here (no key counted twice).
    ext = {key: torch.cat([old[key][:, :, P:], new[key]], dim=2) for key in new}
    ext_pos = torch.cat([old_pos[P:], torch.where(q_pos >= P, q_pos, -1)])
    c = max(win.span, MIN_CHUNK) if chunk is None else chunk
    outs = []
    for c0 in range(0, n, c):
        c1 = min(c0 + c, n)
        cols = slice(c0 + R - rr, c1 + R)  # keys t + c0 - rr .. t + c1 - 1
        kv = {key: torch.cat([pin[key], ext[key][:, :, cols]], dim=2) for key in new}
        k_pos = torch.cat([pin_pos, ext_pos[cols]])
        i, j = q_pos[c0:c1, None], k_pos[None, :]
        ok = (j >= 0) & (j <= i) & ((i - j <= rr) | (j < P))
        if win.allowed is not None:
            ok = ok & win.allowed(i, j.clamp_min(0))
        A = weights(q[:, :, c0:c1], kv.get("k"), q_pos[c0:c1], k_pos, ok)
        outs.append(torch.matmul(A, kv["v"]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    kept = {key: torch.cat([pin[key], ext[key][:, :, n:]], dim=2) for key in new}
    return out, {**kept, "pos": torch.cat([pin_pos, ext_pos[n:]]), "t": t + n}


def softmax_weights(bias: Callable | None = None) -> Weights:
    """``softmax_j(q_i . k_j + bias(i, j))`` over the allowed keys (``q`` already scaled);
    ``bias`` ``(i (c, 1), j (1, L)) -> (H|1, c, L)``, ``-inf`` allowed; dead rows give 0."""

    def weights(qc, kc, q_pos, k_pos, ok):
        s = torch.matmul(qc, kc.transpose(-1, -2))
        if bias is not None:
            s = s + bias(q_pos[:, None], k_pos[None, :])
        return masked_softmax(s, ok)

    return weights


def conv_weights(qc, kc, q_pos, k_pos, ok):
    """A causal convolution's ``A_ij = taps_i[j - i + k - 1]`` (``qc`` the taps ``(B, H, c,
    k)``, tap ``k - 1`` the token itself); 0 outside the ``k`` offsets and in empty slots."""
    taps = qc.shape[-1]
    d = (k_pos[None, :] - q_pos[:, None] + taps - 1).clamp(0, taps - 1)
    A = qc.gather(-1, d.expand(*qc.shape[:2], *d.shape))
    return A.masked_fill(~ok, 0.0)


def decode_softmax(mech, q, k, v, state, scale: float, win: Window, bias=None):
    """``Mechanism._decode`` of a softmax mechanism with a window: inputs in the work
    dtype, ``q`` scaled (as the forwards scale it), ``out`` in the inputs' dtype."""
    work = work_dtype(q.dtype)
    out, new = decode_window(mech.spec.name, win, q.to(work) * scale, k.to(work), v.to(work),
                             state, softmax_weights(bias))
    return out.to(q.dtype), new


def decode_conv(mech, taps, v, state):
    """``Mechanism._decode`` of a causal convolution (:mod:`attnlab.mechanisms.convolution`):
    ``taps`` ``(H, 1, k)`` or ``(B, H, n, k)``, normalised, in the work dtype; its span is
    ``k`` (the token and the ``k - 1`` before it), and it keeps values only."""
    B, H, n, _ = v.shape
    win = Window(taps.shape[-1])
    out, new = decode_window(mech.spec.name, win, taps.expand(B, H, n, -1), None,
                             v.to(taps.dtype), state, conv_weights)
    return out.to(v.dtype), new
