"""Gated linear attention, chunkwise and recurrent: the core of
:mod:`~attnlab.mechanisms.gated_linear`.

Every mechanism of the family is the one recurrence, with ``S`` ``(Dk, Dv)``:

.. math::

    S_t = \\mathrm{diag}(e^{g_t}) S_{t-1} + k_t v_t^\\top, \\qquad o_t = S_t^\\top q_t

``g_t <= 0`` the log-decay of step ``t``: one number per head and step (``g`` ``(B, H, N,
1)``: RetNet's fixed ``log gamma``, Mamba-2's ``-dt_t A``) or one per key dimension
(``(B, H, N, Dk)``: GLA's ``log alpha_t``). Unrolled, ``o_i = sum_{j<=i} (q_i * exp(b_i -
b_j)) . k_j v_j`` with ``b`` the cumulative log-decay: the weight of ``j`` in row ``i`` is a
product of decays ``<= 1``.

**Chunkwise** (:func:`chunk_gated`, Yang et al. 2024's form): ``N`` positions in chunks of
``C``; inside a chunk ``b`` is counted from the chunk's start, so every exponent below is
``<= 0`` and nothing overflows however small the decays are:

* intra-chunk, the ``C x C`` matrix ``A_ij = sum_d q_id k_jd exp(b_id - b_jd)``, ``j <= i``
  (the exponent masked to ``-inf`` above the diagonal *before* ``exp``). Scalar decay: the
  ``C x C`` decay matrix times ``Q K^T``. Per-dimension decay, the secondary chunking of
  GLA: sub-chunks of ``c`` positions; a diagonal sub-block is computed exactly,
  elementwise (``c x c x Dk``); an off-diagonal one (query sub-chunk ``I`` after key
  sub-chunk ``J``) as ``(q_i exp(b_i - r_I)) . (k_j exp(r_I - b_j))`` with ``r_I`` the
  cumulative decay at ``I``'s first row: both factors ``<= 1``, a matmul;
* inter-chunk, the state: ``o_i += (q_i exp(b_i)) S``, then ``S <- exp(b_C) S +
  sum_j (k_j exp(b_C - b_j)) v_j^T``; the only sequential loop, one ``(Dk, Dv)`` update per
  chunk.

Time ``O(N C (Dk + Dv) + N Dk Dv)``, memory ``O(N (C + c Dk + Dv) + (N / C) Dk Dv)`` (``c
Dk`` for per-dimension decay only): no ``N x N`` tensor. The sequence is zero-padded to
whole chunks with ``g = 0``: a padded step neither decays nor writes, so the final state is
the state after the real positions. Gradients are autograd's.

**Recurrent** (:func:`recurrent_gated`): one position at a time, for decoding a few tokens.
**Non-causal** (:func:`bidirectional_gated`): both directions' scans, the diagonal
``(q_t . k_t) v_t`` (weight ``exp(0) = 1`` in both) counted once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnlab.mechanisms._engines.decode_state import check_decode_state

__all__ = ["bidirectional_gated", "chunk_gated", "decode_gated", "recurrent_gated"]

_NEG_INF = float("-inf")


def _tiles(x: torch.Tensor, n: int, C: int) -> torch.Tensor:
    """``(B, H, N, d)`` zero-padded to ``n * C`` positions, as ``(B, H, n, C, d)``."""
    pad = n * C - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(*x.shape[:2], n, C, x.shape[-1])


def _intra_scalar(Q, K, b):
    """``(.., C, C)``: ``(q_i . k_j) exp(b_i - b_j)`` for ``j <= i``; ``b`` ``(.., C, 1)``."""
    b = b[..., 0]
    C = b.shape[-1]
    below = torch.ones(C, C, dtype=torch.bool, device=b.device).tril()
    decay = (b[..., :, None] - b[..., None, :]).masked_fill(~below, _NEG_INF).exp()
    return (Q @ K.transpose(-1, -2)) * decay


def _intra_per_dim(Q, K, b, c: int):
    """``(.., C, C)``: ``sum_d q_id k_jd exp(b_id - b_jd)`` for ``j <= i`` (secondary chunks
    of ``c``: diagonal sub-blocks elementwise, the others relative to the query sub-chunk's
    first row)."""
    *lead, C, Dk = Q.shape
    m = C // c
    Qs, Ks, bs = (x.reshape(*lead, m, c, Dk) for x in (Q, K, b))
    below = torch.ones(c, c, dtype=torch.bool, device=b.device).tril()
    expo = (bs[..., :, None, :] - bs[..., None, :, :]).masked_fill(~below[..., None], _NEG_INF)
    diag = (Qs[..., :, None, :] * Ks[..., None, :, :] * expo.exp()).sum(-1)  # (.., m, c, c)
    if m == 1:
        return diag.reshape(*lead, C, C)
    r = bs[..., 0, :]                                                       # (.., m, Dk)
    Qr = Qs * (bs - r[..., None, :]).exp()
    # key j of sub-chunk J seen from sub-chunk I: exp(r_I - b_j) <= 1 where J < I
    earlier = torch.ones(m, m, dtype=torch.bool, device=b.device).tril(-1)
    expo = (r[..., :, None, None, :] - bs[..., None, :, :, :])             # (.., I, J, c, Dk)
    expo = expo.masked_fill(~earlier[:, :, None, None], _NEG_INF)
    off = torch.einsum("...Iid,...IJjd->...IiJj", Qr, Ks[..., None, :, :, :] * expo.exp())
    eye = torch.eye(m, dtype=Q.dtype, device=Q.device)
    A = off + diag[..., :, :, None, :] * eye[:, None, :, None]
    return A.reshape(*lead, C, C)


def chunk_gated(q, k, v, g, chunk_size: int, S=None, sub_chunk: int = 16):
    """``(o, S)``: the gated recurrence over ``N`` positions, chunk by chunk.

    ``q, k`` ``(B, H, N, Dk)`` (``q`` already scaled), ``v`` ``(B, H, N, Dv)``, ``g`` the
    log-decays ``(B, H, N, 1)`` or ``(B, H, N, Dk)``, all ``<= 0``; ``S`` ``(B, H, Dk, Dv)``
    the state before them (``None``: zeros), the returned ``S`` the state after them.
    ``sub_chunk`` (per-dimension decay only) divides ``chunk_size`` or is ``>=`` it.
    """
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    scalar = g.shape[-1] == 1
    if scalar:
        C = c = min(chunk_size, N)
    else:
        c = min(sub_chunk, chunk_size)
        if chunk_size % c:
            raise ValueError(f"chunk_gated: chunk_size={chunk_size} must be a multiple of "
                             f"sub_chunk={sub_chunk}")
        C = min(chunk_size, -(-N // c) * c)
    n = -(-N // C)
    Q, K, V, G = (_tiles(x, n, C) for x in (q, k, v, g))
    b = G.cumsum(-2)                     # log-decay from the chunk's start: <= 0, decreasing
    A = _intra_scalar(Q, K, b) if scalar else _intra_per_dim(Q, K, b, c)
    last = b[..., -1:, :]                                                   # (B, H, n, 1, Dg)
    U = (K * (last - b).exp()).transpose(-1, -2) @ V                        # (B, H, n, Dk, Dv)
    decay = last.transpose(-1, -2).exp()                                    # (B, H, n, Dg, 1)
    if S is None:
        S = q.new_zeros(B, H, Dk, Dv)
    starts = []
    for i in range(n):  # the only sequential part: one (Dk, Dv) update per chunk
        starts.append(S)
        S = decay[:, :, i] * S + U[:, :, i]
    o = A @ V + (Q * b.exp()) @ torch.stack(starts, dim=2)
    return o.reshape(B, H, n * C, Dv)[:, :, :N], S


def recurrent_gated(q, k, v, g, S=None):
    """``(o, S)`` as :func:`chunk_gated`, one position at a time: ``S <- diag(exp(g_t)) S +
    k_t v_t^T``, ``o_t = S^T q_t``."""
    B, H, N, Dk = q.shape
    if S is None:
        S = q.new_zeros(B, H, Dk, v.shape[-1])
    a = g.exp().unsqueeze(-1)                                               # (B, H, N, Dg, 1)
    outs = []
    for t in range(N):
        S = a[:, :, t] * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(q[:, :, t, None, :] @ S)
    return torch.cat(outs, dim=2), S


def bidirectional_gated(q, k, v, g, chunk_size: int, sub_chunk: int = 16):
    """The non-causal form ``L v + U v - diag(L) v``: the causal scan, the scan of the
    reversed sequence reversed back, and the diagonal ``(q_t . k_t) v_t`` once."""
    fwd, _ = chunk_gated(q, k, v, g, chunk_size, sub_chunk=sub_chunk)
    rev, _ = chunk_gated(q.flip(2), k.flip(2), v.flip(2), g.flip(2), chunk_size,
                         sub_chunk=sub_chunk)
    return fwd + rev.flip(2) - (q * k).sum(-1, keepdim=True) * v


# ---------------------------------------------------------------- decoding
def decode_gated(who: str, q, k, v, g, state, chunk_size: int, sub_chunk: int = 16):
    """``(o, new_state)``: ``state`` continued over ``n`` new positions, recurrently for
    ``n < chunk_size``, else chunkwise (a long prefill: no ``n x n`` tensor). ``q, k, v,
    g`` as :func:`chunk_gated`, in the work dtype the state is kept in."""
    B, H, n, Dk = q.shape
    check_decode_state(who, state, {"S": ((B, H, Dk, v.shape[-1]), q.dtype)}, q.device,
                       "(B, H, Dk, Dv)")
    S = None if state is None else state["S"]
    if n < chunk_size:
        o, S = recurrent_gated(q, k, v, g, S)
    else:
        o, S = chunk_gated(q, k, v, g, chunk_size, S, sub_chunk)
    return o, {"S": S, "t": (0 if state is None else state["t"]) + n}
