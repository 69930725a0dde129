"""Luong et al. 2015's local attention (section 3.2): a window of ``2D + 1`` source keys.

The decoder state ``h_t`` (the query ``q_t``) attends only the source states ``h_s`` (the
keys and values) of the window ``[p_t - D, p_t + D]`` around an aligned position ``p_t``:

* **local-m** (``luong_monotonic``), monotonic alignment: ``p_t = t``, and inside the window
  ``a_t(s) = softmax_s(score(h_t, h_s))``;
* **local-p** (``luong_predictive``), predictive alignment (eq. 9-10)::

      p_t = S * sigmoid(v_p^T tanh(W_p h_t))                                  (9)
      a_t(s) = align(h_t, h_s) exp(-(s - p_t)^2 / (2 sigma^2)),  sigma = D / 2  (10)

  ``align`` is the softmax of the score over the window; ``p_t`` is real-valued, so the
  Gaussian makes it differentiable (``W_p``, ``v_p`` learn where to look). As in the paper
  the Gaussian is applied *after* the softmax: the weights of a row sum to at most 1.

``score(h_t, h_s) = scale * q_t . k_s`` (``scale = 1/sqrt(d)`` unless given; the paper's
``dot`` score), ``D`` is the hyperparameter ``window`` (the paper's ``D``, not a head size;
``d`` is the head size here). ``S`` is the source length: ``Nk``, or with a bool key-padding
mask ``(B|1, H|1, 1, Nk)`` each row's number of real keys (the source length of a
right-padded batch, as :mod:`attnlab.data` collates; a padded row then equals the
unpadded one). Any other mask leaves ``S = Nk``. Keys outside ``[0, Nk)`` are not there.

**Cost.** A query's window holds at most ``W = min(2D + 1, Nk)`` keys, among
``s = floor(p_t) - D .. floor(p_t) + D`` (those with ``|s - p_t| <= D``); ``W`` contiguous
keys holding them are gathered per query, ``chunk_size`` queries at a time: ``O(Nq W d)``
time and, with autograd, memory; no ``Nq x Nk`` tensor unless ``need_weights=True`` (the
dense weights, that call only). ``attn_mask`` is gathered at the window's positions
(bool: a pair must be allowed; float: added to the score); a row with no allowed key in
its window gives zeros.

**Nq != Nk** (cross-attention). local-m's ``p_t = t`` is the paper's (source and target
roughly monotonically aligned); a query past ``Nk - 1 + D`` has an empty window (zeros).
``align="scaled"`` stretches it instead, ``p_t = t (S - 1) / (Nq - 1)`` (``0`` when
``Nq = 1``): then ``p_t`` depends on ``Nq``, so decoding a prefix step by step sees other
windows than teacher forcing on the whole target. Neither form can decode one query at a
time with a KV cache (``p_t`` needs the query's index, which a one-token call does not
know): ``kv_cache=False``. **Causal**: local-m's causal form is its window cut to
``s <= t`` (``[t - D, t]``, causal local attention); local-p predicts ``p_t`` anywhere in
the source, so it has none (``causal=False``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.contract import masked_softmax, work_dtype
from attnlab.mechanisms.base import Mechanism
from attnlab.mechanisms.classic import LUONG_2015
from attnlab.registry import REQUIRED, HParam, Limit, register_mechanism
from attnlab.verify import param_f64

__all__ = ["LuongMonotonic", "LuongPredictive", "predictive_reference", "source_lengths"]

_FLAGS = dict(family="luong", paper=LUONG_2015, exact=False, arbitrary_mask=True, cross=True,
              returns_weights=True, half_precision=True, kv_cache=False)
_COST = dict(time="O(Nq W d), W = min(2D + 1, Nk), D = window",
             memory="O(Nq W d) with autograd (the gathered windows); without: "
                    "O(chunk W d) above the output")
_CHUNK = HParam("chunk_size", int, 256, "queries whose windows are gathered at once", low=1)


def source_lengths(attn_mask: torch.Tensor | None, nk: int, dtype) -> torch.Tensor | float:
    """``S``: ``(B|1, H|1, 1)`` real keys per row of a bool key-padding mask (Nq dim 1),
    else ``Nk`` (any other mask, or none)."""
    if attn_mask is None or attn_mask.dtype != torch.bool or attn_mask.shape[-2] != 1:
        return float(nk)
    shape = (*attn_mask.shape[:-1], nk)
    return attn_mask.expand(shape).sum(-1).to(dtype)


def _gather_mask(mask: torch.Tensor, i0: int, i1: int, idx: torch.Tensor) -> torch.Tensor:
    """The 4-D broadcastable mask at rows ``i0:i1`` and each query's window columns ``idx``
    ``(B, H, c, W)``: ``(B|1, H|1, c|1, W|1)``, never an ``Nq x Nk`` intermediate."""
    m = mask if mask.shape[-2] == 1 else mask[..., i0:i1, :]
    if m.shape[-1] == 1:
        return m
    B, H, c, _ = idx.shape
    return m.expand(B, H, c, m.shape[-1]).gather(-1, idx)


def _window(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, H, Nk, e)`` at positions ``idx`` ``(B, H, c, W)``: ``(B, H, c, W, e)``."""
    B, H, c, W = idx.shape
    flat = idx.reshape(B, H, c * W, 1).expand(B, H, c * W, x.shape[-1])
    return x.gather(2, flat).view(B, H, c, W, x.shape[-1])


class _LocalAttention(Mechanism):
    """The window machinery both forms share; a subclass gives ``p_t`` (:meth:`centres`)
    and says whether the Gaussian of eq. 10 weights the window (``sigma``)."""

    def centres(self, qc: torch.Tensor, i0: int, nq: int, S) -> torch.Tensor:
        """``p_t`` for the chunk ``qc`` (rows ``i0 ..`` of ``nq`` queries), broadcastable to
        ``(B, H, c)``; ``S`` from :func:`source_lengths`."""
        raise NotImplementedError

    def sigma(self) -> float | None:
        return None

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        nq, nk, dtype, work = q.shape[-2], k.shape[-2], q.dtype, work_dtype(q.dtype)
        q, k, v = q.to(work), k.to(work), v.to(work)
        S = source_lengths(attn_mask, nk, work)
        step = self.hp["chunk_size"]
        outs, weights = [], []
        for i0 in range(0, nq, step):
            i1 = min(i0 + step, nq)
            p = self.centres(q[..., i0:i1, :], i0, nq, S)
            o, w = self._chunk(q[..., i0:i1, :], k, v, p, attn_mask, is_causal, scale,
                               dropout_p, need_weights, i0)
            outs.append(o)
            weights.append(w)
        out = (torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]).to(dtype)
        return out, (torch.cat(weights, dim=-2).to(dtype) if need_weights else None)

    def _chunk(self, qc, k, v, p, attn_mask, is_causal, scale, dropout_p, need_weights, i0):
        """Queries ``i0 .. i0 + c`` with centres ``p``: ``(out, dense weights or None)``."""
        B, H, c, _ = qc.shape
        nk, D = k.shape[-2], self.hp["window"]
        p = p.expand(B, H, c)                                             # p_t
        # The window's keys lie in floor(p_t) - D .. floor(p_t) + D, inside [0, Nk): W
        # contiguous slots from a start moved into [0, Nk - W] hold them all.
        W = min(2 * D + 1, nk)
        start = (p.detach().floor().long() - D).clamp(0, nk - W)
        s = start.unsqueeze(-1) + torch.arange(W, device=qc.device)      # (B, H, c, W)
        dist = s.to(p.dtype) - p.unsqueeze(-1)                           # s - p_t
        allowed = dist.detach().abs() <= D
        if is_causal:
            allowed = allowed & (s <= torch.arange(i0, i0 + c, device=qc.device)[:, None])
        idx = s
        scores = torch.einsum("bhcd,bhcwd->bhcw", qc * scale, _window(k, idx))
        if attn_mask is not None:
            m = _gather_mask(attn_mask, i0, i0 + c, idx)
            if m.dtype == torch.bool:
                allowed = allowed & m
            else:
                scores = scores + m.to(scores.dtype)
        a = masked_softmax(scores, allowed)
        sigma = self.sigma()
        if sigma is not None:  # eq. 10: the Gaussian around p_t, after the softmax
            a = a * torch.exp(-dist.square() / (2 * sigma * sigma))
        a_used = F.dropout(a, dropout_p) if dropout_p > 0 else a
        out = torch.einsum("bhcw,bhcwe->bhce", a_used, _window(v, idx))
        if not need_weights:
            return out, None
        # Each slot is a distinct key column; those outside the window carry a zero weight.
        return out, a.new_zeros(B, H, c, nk).scatter(-1, idx, a)


@register_mechanism(
    "luong_monotonic",
    equation="a_t(s) = softmax_{s in [p_t - D, p_t + D]}(scale * q_t . k_s),  p_t = t",
    causal=True, learnable=False,
    aliases=("local_m", "luong_local_m"),
    hparams=[
        HParam("window", int, 10, "D: the window is [p_t - D, p_t + D] (2D + 1 keys)", low=0),
        HParam("align", str, "identity", "p_t = t (identity, the paper's) or t (S-1)/(Nq-1) "
               "(scaled, for Nq != Nk)", choices=("identity", "scaled")),
        _CHUNK,
    ],
    tiny_hparams={"window": 2, "chunk_size": 5},
    limit=Limit(hparams=lambda n: {"window": n},
                note="window D >= N: every key in every window, full attention"),
    **_FLAGS, **_COST,
)
class LuongMonotonic(_LocalAttention):
    """Luong local-m attention: softmax over the keys ``[t - D, t + D]`` of query ``t``.

    ``p_t = t`` (``align="identity"``, Luong et al. 2015 sec. 3.2) or ``t (S - 1) / (Nq - 1)``
    (``align="scaled"``); ``window`` is ``D``. ``D = 0`` attends the aligned key alone.
    """

    def centres(self, qc, i0, nq, S):
        t = torch.arange(i0, i0 + qc.shape[-2], device=qc.device, dtype=qc.dtype)
        if self.hp["align"] == "identity":
            return t
        if nq == 1:
            return torch.zeros_like(t)
        # (S - 1) / (Nq - 1) maps query Nq - 1 to the last real key; S = 0 (no key) to 0.
        ratio = (S - 1.0) / (nq - 1)
        return t * (ratio.clamp_min(0.0) if isinstance(ratio, torch.Tensor) else max(ratio, 0.0))


def _init_predictor(W_p: nn.Parameter, v_p: nn.Parameter) -> None:
    nn.init.xavier_uniform_(W_p)
    bound = 1.0 / math.sqrt(v_p.shape[0])
    nn.init.uniform_(v_p, -bound, bound)


def predictive_reference(q, k, v, *, mech, scale, is_causal, attn_mask=None):
    """Eq. 9-10 written densely in float64: every ``(t, s)`` pair, the window as a mask."""
    if is_causal:
        raise ValueError("luong_predictive has no causal form")
    q, k, v = q.double(), k.double(), v.double()
    W_p, v_p = param_f64(mech.W_p), param_f64(mech.v_p)
    D = mech.hp["window"]
    nk = k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S = source_lengths(attn_mask, nk, torch.float64)
    p = S * torch.sigmoid(torch.tanh(q @ W_p.T) @ v_p)                  # eq. 9, (B, H, Nq)
    dist = torch.arange(nk, dtype=torch.float64) - p.unsqueeze(-1)     # s - p_t
    allowed = dist.abs() <= D
    scores = q @ k.transpose(-2, -1) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.double()
    scores = scores.masked_fill(~allowed, -math.inf)
    top = scores.amax(-1, keepdim=True)
    e = torch.exp(scores - torch.where(torch.isfinite(top), top, 0.0))
    z = e.sum(-1, keepdim=True)
    align = torch.where(z > 0, e / torch.where(z > 0, z, 1.0), 0.0)
    sigma = D / 2
    a = align * torch.exp(-dist**2 / (2 * sigma**2))                   # eq. 10
    return a @ v


@register_mechanism(
    "luong_predictive",
    equation="a_t(s) = softmax_{s in [p_t - D, p_t + D]}(scale * q_t . k_s) "
             "exp(-(s - p_t)^2 / (2 sigma^2)),  p_t = S sigmoid(v_p^T tanh(W_p q_t)),  "
             "sigma = D / 2",
    causal=False, learnable=True,
    aliases=("local_p", "luong_local_p"),
    hparams=[
        HParam("head_dim", int, REQUIRED, "size d of each query head (W_p is A x d)", low=1),
        HParam("hidden_dim", int, None, "rows A of W_p (None = head_dim)", low=1,
               nullable=True),
        HParam("window", int, 10, "D: the window is [p_t - D, p_t + D]; sigma = D / 2", low=1),
        _CHUNK,
    ],
    tiny_hparams={"window": 2, "chunk_size": 5},
    # D >= N puts every key of [0, N) inside every window (|s - p_t| <= N for p_t in
    # [0, N]): eq. 9-10 without a window edge, where float32 and float64 p_t could differ
    # on which key is in. The Gaussian (sigma = N / 2) and W_p, v_p are all checked; the
    # window edge is checked in float64 by tests/test_luong.py.
    limit=Limit(hparams=lambda n: {"window": max(n, 1)},
                note="its own eq. 9-10 (window D >= N), dense in float64",
                reference=predictive_reference),
    **_FLAGS, **_COST,
)
class LuongPredictive(_LocalAttention):
    """Luong local-p attention: a window around a predicted ``p_t``, Gaussian-weighted.

    ``p_t = S sigmoid(v_p^T tanh(W_p q_t))`` (eq. 9; ``W_p`` ``A x d``, ``v_p`` ``A``, one
    pair shared by every head, as :mod:`attnlab.mechanisms.classic` shares its alignment
    models) and ``a_t(s) = align(q_t, k_s) exp(-(s - p_t)^2 / (2 sigma^2))``, ``sigma = D/2``
    (eq. 10). ``p_t`` is in ``[0, S]``; :meth:`positions` gives it.
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        d = self.hp["head_dim"]
        a = self.hp["hidden_dim"] or d
        self.W_p = nn.Parameter(torch.empty(a, d))
        self.v_p = nn.Parameter(torch.empty(a))
        _init_predictor(self.W_p, self.v_p)

    def sigma(self) -> float:
        return self.hp["window"] / 2

    def centres(self, q, i0, nq, S):
        if q.shape[-1] != self.hp["head_dim"]:
            raise ValueError(f"luong_predictive: q head dim {q.shape[-1]} does not match "
                             f"head_dim={self.hp['head_dim']} the module was built with")
        W_p, v_p = self.W_p.to(q.dtype), self.v_p.to(q.dtype)
        return S * torch.sigmoid(torch.tanh(q @ W_p.T) @ v_p)         # eq. 9

    def positions(self, q: torch.Tensor, source_length: int) -> torch.Tensor:
        """``p_t`` ``(B, H, Nq)`` of eq. 9 for queries ``q`` and a source of that length."""
        return self.centres(q.to(work_dtype(q.dtype)), 0, q.shape[-2], float(source_length))
