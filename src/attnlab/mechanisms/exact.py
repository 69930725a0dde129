"""Exact scaled dot-product attention: the definition, PyTorch's fused kernels, FlashAttention.

.. math::

    \\mathrm{Attention}(Q, K, V) =
    \\mathrm{softmax}\\!\\left(\\frac{QK^\\top}{\\sqrt{d}} + M\\right) V

``reference`` is the definition written plainly: it forms the ``(Nq, Nk)`` score matrix
and is the yardstick every other mechanism is tested against (``precision="float64"``
computes in double and returns the input dtype). ``sdpa`` hands the same computation to
``torch.nn.functional.scaled_dot_product_attention``, which picks PyTorch's fastest
fused kernel (flash / memory-efficient / math) for the inputs. ``flash`` computes it in
plain PyTorch, tile by tile with an online softmax and its own backward (below).

**flash** (FlashAttention, Dao et al. 2022) never forms the ``(Nq, Nk)`` score matrix.
Queries are cut into blocks ``Q_i`` (``block_q`` rows) and keys/values into blocks
``K_j, V_j`` (``block_k`` rows); each query block streams over the key blocks keeping,
per row, a running max ``m``, a running normaliser ``l`` and an unnormalised output
accumulator ``acc``:

.. math::

    S_{ij} &= \\tau\\, Q_i K_j^\\top + M_{ij}, \\qquad
    m^{new} = \\max(m,\\ \\mathrm{rowmax}\\, S_{ij}), \\qquad
    P_{ij} = e^{S_{ij} - m^{new}} \\\\
    l &\\leftarrow e^{m - m^{new}}\\, l + \\mathrm{rowsum}\\, P_{ij}, \\qquad
    acc \\leftarrow e^{m - m^{new}}\\, acc + P_{ij} V_j, \\qquad m \\leftarrow m^{new}

and at the end ``O_i = acc / l`` and ``L_i = m + log l`` (the row log-sum-exp). Only
``Q, K, V, O`` and ``L`` are kept for backward, so memory is ``O(N)``: the backward pass
*recomputes* each tile ``P_ij = exp(S_ij - L_i)`` (FlashAttention-2 ordering). Under
``is_causal`` the tiles the mask removes entirely are never computed, forward or backward.
The engine, with its implementation notes, is :mod:`attnlab.mechanisms._engines.flash`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnlab.contract import masked_softmax, merge_masks, repeat_kv_heads, work_dtype
from attnlab.mechanisms._engines.flash import FlashAttentionFunction  # re-exported
from attnlab.mechanisms.base import Mechanism
from attnlab.registry import HParam, Limit, Paper, register_mechanism

__all__ = ["EXACT", "VASWANI_2017", "FlashAttention", "FlashAttentionFunction",
           "ReferenceAttention", "SDPAttention", "flash_attention", "softmax_attention"]

VASWANI_2017 = Paper(
    "Attention Is All You Need",
    "Ashish Vaswani, Noam Shazeer, Niki Parmar, Jakob Uszkoreit, Llion Jones, "
    "Aidan N. Gomez, Lukasz Kaiser, Illia Polosukhin",
    2017,
    "https://arxiv.org/abs/1706.03762",
)
SDPA_EQ = "softmax(Q K^T * scale + M) V,  scale = 1/sqrt(d)"
# Exact mechanisms need no limit: the gate compares them with softmax attention as they are.
EXACT = Limit(hparams=lambda n: {}, note="exact: softmax attention as it is")


def softmax_attention(q, k, v, mask, scale, dropout_p=0.0):
    """softmax(QK^T*scale + M)V; returns (out, weights) in the dtype of ``q``.

    Half-precision inputs are computed in float32, as SDPA's kernels and ``flash`` do: a
    float16 ``q . k`` overflows to inf past 65504 (``|q| |k|`` of a few hundred), which
    the softmax turns into NaN, and 11-bit scores of size 1e4 are off by whole units.
    ``scale`` multiplies ``q`` before the product, so ``q . k * scale`` never exists
    unscaled (and the (Nq, D) product is cheaper than an (Nq, Nk) one).
    """
    dtype, work = q.dtype, work_dtype(q.dtype)
    q, k, v = q.to(work), k.to(work), v.to(work)
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    p = masked_softmax(scores, mask)
    p_used = torch.nn.functional.dropout(p, dropout_p) if dropout_p > 0 else p
    return torch.matmul(p_used, v).to(dtype), p.to(dtype)


@register_mechanism(
    "reference",
    family="exact",
    paper=VASWANI_2017,
    time="O(N^2 D)",
    memory="O(N^2)",
    equation=SDPA_EQ,
    exact=True, causal=True, arbitrary_mask=True, cross=True, returns_weights=True,
    kv_cache=True,
    aliases=("naive", "vanilla", "softmax"),
    limit=EXACT,
    flops="softmax_attention",
    hparams=[
        HParam("precision", str, "native", "compute dtype: the inputs' own, or float64",
               choices=("native", "float64")),
    ],
)
class ReferenceAttention(Mechanism):
    """The definition, softmax(QK^T/sqrt(d))V, written plainly; the yardstick."""

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        mask = merge_masks(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.device)
        if self.hp["precision"] == "float64" and q.dtype != torch.float64:
            dt = q.dtype
            if mask is not None and mask.dtype != torch.bool:
                mask = mask.double()
            out, w = softmax_attention(q.double(), k.double(), v.double(), mask, scale, dropout_p)
            return out.to(dt), (w.to(dt) if need_weights else None)
        out, w = softmax_attention(q, k, v, mask, scale, dropout_p)
        return out, (w if need_weights else None)


@register_mechanism(
    "sdpa",
    family="exact",
    paper=VASWANI_2017,
    time="O(N^2 D)",
    memory="O(N) (fused kernels)",
    equation=SDPA_EQ + "  [torch.nn.functional.scaled_dot_product_attention]",
    exact=True, causal=True, arbitrary_mask=True, cross=True, returns_weights=True,
    kv_cache=True,
    aliases=("torch", "fused"),
    limit=EXACT,
    flops="softmax_attention",
    summary="PyTorch's fused scaled_dot_product_attention kernels (fastest exact path).",
)
class SDPAttention(Mechanism):
    """PyTorch's fused scaled_dot_product_attention kernels (fastest exact path).

    SDPA never forms the weights; with ``need_weights=True`` this falls back to the
    reference computation (O(N^2) memory) for that call only. Grouped-query heads
    (``enable_gqa``) go to SDPA as they are: its kernels read each key/value head once.
    """

    native_gqa = True

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        if need_weights:
            k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])
            mask = merge_masks(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.device)
            return softmax_attention(q, k, v, mask, scale, dropout_p)
        if is_causal and attn_mask is not None:
            # SDPA refuses both at once; fold the causal constraint into the mask.
            attn_mask = merge_masks(attn_mask, True, q.shape[-2], k.shape[-2], q.device)
            is_causal = False
        gqa = k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=gqa,
        )
        return out, None


# ------------------------------------------------------------------------- flash
DAO_2022 = Paper(
    "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness",
    "Tri Dao, Daniel Y. Fu, Stefano Ermon, Atri Rudra, Christopher Ré",
    2022,
    "https://arxiv.org/abs/2205.14135",
)


def flash_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0,
                    block_q=256, block_k=512):
    """Functional FlashAttention (no input validation; see :class:`FlashAttention`)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return FlashAttentionFunction.apply(q, k, v, attn_mask, is_causal, scale, float(dropout_p),
                                        block_q, block_k)


@register_mechanism(
    "flash",
    family="exact",
    paper=DAO_2022,
    time="O(N^2 D)",
    memory="O(N)",
    equation="softmax(Q K^T * scale + M) V, tiled with an online softmax; backward recomputes",
    exact=True, causal=True, arbitrary_mask=True, cross=True, returns_weights=False,
    half_precision=True, kv_cache=True,
    aliases=("blockwise", "online_softmax"),
    # The user's tiles stay: the gate checks the tiling the benchmark runs.
    limit=Limit(hparams=lambda n: {}, note="exact: softmax attention, tiled"),
    flops="softmax_attention",  # FlopCounterMode misses its in-place baddbmm_ (P V)
    hparams=[
        HParam("block_q", int, 256, "query rows per tile", low=1),
        HParam("block_k", int, 512, "key rows per tile", low=1),
    ],
)
class FlashAttention(Mechanism):
    """FlashAttention: exact attention in tiles with an online softmax, O(N) memory."""

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        out = FlashAttentionFunction.apply(q, k, v, attn_mask, is_causal, scale, dropout_p,
                                           self.hp["block_q"], self.hp["block_k"])
        return out, None
