"""The classic score functions of the attention tutorials.

Every mechanism here is ``softmax(score(q_i, k_j) * scale + M) V``; only the score
function changes. Each computes its own defined attention exactly (no approximation):

* ``additive`` -- Bahdanau et al. 2015: ``v_a^T tanh(W_a q_i + U_a k_j)`` (learnable);
* ``general``  -- Luong et al. 2015:   ``q_i^T W_a k_j`` (learnable);
* ``dot``      -- Luong et al. 2015:   ``q_i^T k_j``;
* ``scaled_dot`` -- Vaswani et al. 2017: ``q_i^T k_j / sqrt(d)``, the textbook formula.

Masks and ``is_causal`` follow :mod:`attnlab.contract` (fully masked rows give zeros);
for half-precision inputs the scores, the softmax and the weighted sum run in float32
(a float16 ``q . k`` overflows past 65504) and the output comes back in the input dtype.
The learnable mechanisms keep one set of parameters *shared across heads*: the contract
hands them per-head ``(B, H, N, head_dim)`` tensors with ``H`` known only at call time,
and the papers have a single alignment model; per-head projections belong to the
surrounding multi-head layer's input projections (:class:`attnlab.nn.MultiheadAttention`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.contract import masked_softmax, merge_masks, slice_mask, work_dtype
from attnlab.mechanisms.base import Mechanism
from attnlab.mechanisms.exact import EXACT, VASWANI_2017, softmax_attention
from attnlab.registry import REQUIRED, HParam, Limit, Paper, register_mechanism
from attnlab.verify import causal_allowed, dense_softmax_f64, param_f64

BAHDANAU_2015 = Paper(
    "Neural Machine Translation by Jointly Learning to Align and Translate",
    "Dzmitry Bahdanau, Kyunghyun Cho, Yoshua Bengio",
    2015,
    "https://arxiv.org/abs/1409.0473",
)
LUONG_2015 = Paper(
    "Effective Approaches to Attention-based Neural Machine Translation",
    "Minh-Thang Luong, Hieu Pham, Christopher D. Manning",
    2015,
    "https://arxiv.org/abs/1508.04025",
)

_FLAGS = dict(family="classic", exact=True, causal=True, arbitrary_mask=True, cross=True,
              returns_weights=True, kv_cache=True)
_HEAD_DIM = HParam("head_dim", int, REQUIRED, "size D of each query/key head", low=1)


# ---------------------------------------------------------------- float64 references
# Each score function written plainly in float64 for the correctness gate (attnlab.verify):
# the dense (Nq, Nk) scores, then softmax. ``scale=None`` is the papers' 1 (no scaling).
def _reference(scores, v, scale, is_causal):
    allowed = causal_allowed(scores.shape[-2], scores.shape[-1]) if is_causal else None
    return dense_softmax_f64(scores * (1.0 if scale is None else scale), v, allowed)


def additive_reference(q, k, v, *, mech, scale, is_causal):
    """e_ij = v_a^T tanh(W_a q_i + U_a k_j), a few queries at a time (bounds the tanh tensor)."""
    W_a, U_a, v_a = (param_f64(p) for p in (mech.W_a, mech.U_a, mech.v_a))
    uk = (k @ U_a.T).unsqueeze(-3)                                     # (B, H, 1, Nk, A)
    rows = [torch.tanh((q[..., i:i + 16, :] @ W_a.T).unsqueeze(-2) + uk) @ v_a
            for i in range(0, q.shape[-2], 16)]
    return _reference(torch.cat(rows, dim=-2), v, scale, is_causal)


def general_reference(q, k, v, *, mech, scale, is_causal):
    """score(q_i, k_j) = q_i^T W_a k_j."""
    return _reference(q @ param_f64(mech.W_a) @ k.transpose(-2, -1), v, scale, is_causal)


def dot_reference(q, k, v, *, mech, scale, is_causal):
    """score(q_i, k_j) = q_i^T k_j, unscaled."""
    return _reference(q @ k.transpose(-2, -1), v, scale, is_causal)


def unit_logit_inputs(q, k, v, gen):
    """q, k scaled by D^(-1/4): the unscaled scores q^T k (q^T W_a k) then have unit variance,
    as scaled attention's. Unit-normal inputs would give scores of size sqrt(D), whose
    rounding in half precision (1e-2 of ~30 at D = 128) is the inputs' conditioning, not
    an error of the implementation."""
    c = q.shape[-1] ** -0.25
    return q * c, k * c, v


def _check_head_dim(name: str, q: torch.Tensor, head_dim: int) -> None:
    if q.shape[-1] != head_dim:
        raise ValueError(
            f"{name}: q head dim {q.shape[-1]} does not match head_dim={head_dim} the module "
            f"was built with; create it with head_dim={q.shape[-1]} or reshape q"
        )


@register_mechanism(
    "additive",
    paper=BAHDANAU_2015,
    time="O(N^2 A)",
    memory="O(chunk N A) forward (autograd keeps O(N^2 A))",
    equation="softmax(scale * v_a^T tanh(W_a q_i + U_a k_j) + M) V,  scale = 1",
    learnable=True,
    hparams=[
        _HEAD_DIM,
        HParam("hidden_dim", int, None, "alignment size A (None = head_dim)", low=1,
               nullable=True),
        HParam("chunk_size", int, 128, "queries per chunk (bounds the tanh tensor)", low=1),
    ],
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, v_a^T tanh(W_a q + U_a k)",
                reference=additive_reference),
    **_FLAGS,
)
class AdditiveAttention(Mechanism):
    """Bahdanau additive attention: score(q_i, k_j) = v_a^T tanh(W_a q_i + U_a k_j).

    Symbols as in the paper (eq. 6 of appendix A.1.2, ``e_ij = v_a^T tanh(W_a s_{i-1} +
    U_a h_j)``): the decoder state ``s_{i-1}`` is the query ``q_i``, the annotation ``h_j``
    is the key ``k_j``; ``W_a`` and ``U_a`` (``A x D``) are what other texts call ``W_q``
    and ``W_k``. The score is multiplied by ``scale`` (default 1, no scaling in the paper).

    Queries are processed ``chunk_size`` at a time, so the ``(chunk, Nk, A)`` tanh tensor
    bounds memory; rows are independent, so chunking does not change the result.
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        d = self.hp["head_dim"]
        a = self.hp["hidden_dim"] or d
        self.W_a = nn.Parameter(torch.empty(a, d))
        self.U_a = nn.Parameter(torch.empty(a, d))
        self.v_a = nn.Parameter(torch.empty(a))
        nn.init.xavier_uniform_(self.W_a)
        nn.init.xavier_uniform_(self.U_a)
        nn.init.uniform_(self.v_a, -1.0 / math.sqrt(a), 1.0 / math.sqrt(a))

    def default_scale(self, d: int) -> float:
        return 1.0

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        _check_head_dim("additive", q, self.hp["head_dim"])
        nq, nk = q.shape[-2], k.shape[-2]
        mask = merge_masks(attn_mask, is_causal, nq, nk, q.device)
        work = work_dtype(q.dtype)  # tanh/sum in >= float32
        W_a, U_a, v_a = (p.to(work) for p in (self.W_a, self.U_a, self.v_a))
        uk = k.to(work) @ U_a.T                                        # (B, H, Nk, A)
        vw = v.to(work)
        outs, weights = [], []
        step = self.hp["chunk_size"]
        for i0 in range(0, nq, step):
            i1 = min(i0 + step, nq)
            wq = q[..., i0:i1, :].to(work) @ W_a.T                      # (B, H, c, A)
            e = torch.tanh(wq.unsqueeze(-2) + uk.unsqueeze(-3)) @ v_a   # (B, H, c, Nk)
            m = None if mask is None else slice_mask(mask, i0, i1, 0, nk)
            p = masked_softmax(e * scale, m)
            p_used = F.dropout(p, dropout_p) if dropout_p > 0 else p
            outs.append(p_used @ vw)
            if need_weights:
                weights.append(p.to(v.dtype))
        out = torch.cat(outs, dim=-2).to(v.dtype)
        return out, (torch.cat(weights, dim=-2) if need_weights else None)


@register_mechanism(
    "general",
    paper=LUONG_2015,
    time="O(N^2 D + N D^2)",
    memory="O(N^2)",
    equation="softmax(scale * q_i^T W_a k_j + M) V,  scale = 1",
    learnable=True,
    hparams=[
        _HEAD_DIM,
        HParam("init", str, "xavier", "initial W_a", choices=("identity", "xavier")),
    ],
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, q^T W_a k (unscaled)",
                reference=general_reference, inputs=unit_logit_inputs),
    flops="bilinear_attention",
    **_FLAGS,
)
class GeneralAttention(Mechanism):
    """Luong "general" (bilinear) attention: score(q_i, k_j) = q_i^T W_a k_j.

    ``W_a`` is ``D x D``; computed as ``(q W_a) k^T``. With ``W_a = I`` it is ``dot``.
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        d = self.hp["head_dim"]
        self.W_a = nn.Parameter(torch.empty(d, d))
        if self.hp["init"] == "identity":
            nn.init.eye_(self.W_a)
        else:
            nn.init.xavier_uniform_(self.W_a)

    def default_scale(self, d: int) -> float:
        return 1.0

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        _check_head_dim("general", q, self.hp["head_dim"])
        mask = merge_masks(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.device)
        # q W_a in float32 for half inputs too: rounded to 11 bits, it would be multiplied
        # by |k| (scores of size 1e4 off by units); softmax_attention keeps float32 then.
        dtype, work = q.dtype, work_dtype(q.dtype)
        qw = q.to(work) @ self.W_a.to(work)
        out, w = softmax_attention(qw, k, v, mask, scale, dropout_p)
        return out.to(dtype), (w.to(dtype) if need_weights else None)


@register_mechanism(
    "dot",
    paper=LUONG_2015,
    time="O(N^2 D)",
    memory="O(N^2)",
    equation="softmax(scale * q_i^T k_j + M) V,  scale = 1",
    aliases=("luong_dot",),
    limit=Limit(hparams=lambda n: {}, note="exact: softmax(q^T k) V, unscaled",
                reference=dot_reference, inputs=unit_logit_inputs),
    flops="softmax_attention",
    **_FLAGS,
)
class DotAttention(Mechanism):
    """Luong dot attention: score(q_i, k_j) = q_i^T k_j (unscaled; ``scale`` multiplies)."""

    def default_scale(self, d: int) -> float:
        return 1.0

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        mask = merge_masks(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.device)
        out, w = softmax_attention(q, k, v, mask, scale, dropout_p)
        return out, (w if need_weights else None)


@register_mechanism(
    "scaled_dot",
    paper=VASWANI_2017,
    time="O(N^2 D)",
    memory="O(N^2)",
    equation="softmax(Q K^T / sqrt(d_k) + M) V",
    aliases=("scaled_dot_product",),
    limit=EXACT,
    flops="softmax_attention",
    **_FLAGS,
)
class ScaledDotAttention(Mechanism):
    """Scaled dot-product attention as the tutorials write it: softmax(QK^T/sqrt(d_k))V.

    ``scale`` defaults to ``1/sqrt(d_k)``; an explicit ``scale`` replaces it.
    """

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        # Half inputs in float32 (as softmax_attention): float16 q k^T overflows past 65504.
        # scale = 1 / sqrt(d_k) unless the caller gave one (Mechanism.default_scale); it
        # goes on q so that the unscaled q k^T is never formed.
        dtype, work = q.dtype, work_dtype(q.dtype)
        q, k, v = q.to(work), k.to(work), v.to(work)
        scores = torch.matmul(q * scale, k.transpose(-2, -1))
        mask = merge_masks(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.device)
        p_attn = masked_softmax(scores, mask)
        if dropout_p > 0:
            out = torch.matmul(F.dropout(p_attn, dropout_p), v)
        else:
            out = torch.matmul(p_attn, v)
        return out.to(dtype), (p_attn.to(dtype) if need_weights else None)
