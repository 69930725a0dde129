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
*recomputes* each tile ``P_ij = exp(S_ij - L_i)`` (FlashAttention-2 ordering)::

    D_i   = rowsum(dO_i * O_i)
    dV_j += P_ij^T dO_i          dP_ij = dO_i V_j^T          dS_ij = P_ij * (dP_ij - D_i)
    dQ_i += tau dS_ij K_j        dK_j += tau dS_ij^T Q_i     (dM_ij = dS_ij for a float mask)

Implementation notes. Scores are kept in base-2 units (``Q`` is pre-multiplied by
``tau * log2(e)``) because ``exp2`` is several times faster than ``exp`` on CPU; ``m`` and
``L`` are therefore base-2 too. Dropout multiplies ``P_ij`` by a keep mask drawn from a
per-tile generator seeded from ``(seed, i, j)``, so backward regenerates the very same mask
without storing it; ``l`` uses the undropped ``P``. Half-precision inputs are computed
in float32 and returned in their own dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from attnlab.contract import (
    masked_softmax,
    merge_masks,
    repeat_kv_heads,
    slice_mask,
    work_dtype,
)
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
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_INF = float("inf")
_GOLDEN = 0x9E3779B97F4A7C15  # odd, so distinct tile numbers give distinct seeds


def _blocked(attn_mask):
    """A bool mask inverted (True = blocked) so that each tile is one ``masked_fill_``."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return ~attn_mask


def _tile(buf, BH, n, m):
    """A contiguous ``(BH, n, m)`` view of a reused buffer: fresh multi-MB allocations
    cost page faults on every tile, measurably slowing the loop on CPU."""
    return buf[: BH * n * m].view(BH, n, m)


def _scores(ctx, mask, q_i, k_j, i0, i1, j0, j1, buf):
    """Tile ``S_ij`` (base-2 units), masked: ``-inf`` where a pair may not attend."""
    S = torch.bmm(q_i, k_j.transpose(1, 2), out=_tile(buf, q_i.shape[0], i1 - i0, j1 - j0))
    if mask is not None:
        S4 = S.view(ctx.B, ctx.H, i1 - i0, j1 - j0)  # masks broadcast against (B, H, n, m)
        tile = slice_mask(mask, i0, i1, j0, j1)
        if mask.dtype == torch.bool:
            S4.masked_fill_(tile, -_INF)  # a bool tile holds the *blocked* pairs
        else:
            S4.add_(tile, alpha=LOG2E)
    if ctx.is_causal and j1 - 1 > i0:  # the tile crosses the diagonal: block key > query
        blocked = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=S.device)
        S.masked_fill_(blocked.triu_(i0 - j0 + 1), -_INF)
    return S


def _keep(ctx, shape, bi, bj, device):
    """Dropout's ``keep / (1 - p)`` for tile ``(bi, bj)``, identical in forward and backward."""
    tile_no = bi * ctx.n_kblocks + bj + 1
    g = torch.Generator(device=device)
    g.manual_seed((ctx.seed + tile_no * _GOLDEN) % 2**63)
    r = torch.rand(shape, generator=g, device=device, dtype=ctx.wdt)
    return (r >= ctx.dropout_p).to(ctx.wdt).mul_(1.0 / (1.0 - ctx.dropout_p))


class FlashAttentionFunction(torch.autograd.Function):
    """``apply(q, k, v, attn_mask, is_causal, scale, dropout_p, block_q, block_k)``."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, dropout_p, block_q, block_k):
        B, H, Nq, D = q.shape
        Nk, Dv = k.shape[2], v.shape[3]
        wdt = work_dtype(q.dtype)
        ctx.B, ctx.H, ctx.is_causal, ctx.wdt = B, H, is_causal, wdt
        ctx.scale, ctx.dropout_p, ctx.bq, ctx.bk = scale, dropout_p, block_q, block_k
        ctx.n_kblocks = -(-Nk // block_k)
        mask = _blocked(attn_mask)
        # Base seed from the global RNG: torch.manual_seed makes dropout reproducible.
        ctx.seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0

        qs = q.reshape(B * H, Nq, D).to(wdt) * (scale * LOG2E)
        k3 = k.reshape(B * H, Nk, D).to(wdt)
        v3 = v.reshape(B * H, Nk, Dv).to(wdt)
        O = torch.empty(B * H, Nq, Dv, dtype=wdt, device=q.device)
        L = torch.empty(B * H, Nq, dtype=wdt, device=q.device)
        buf = torch.empty(B * H * block_q * block_k, dtype=wdt, device=q.device)
        for bi, i0 in enumerate(range(0, Nq, block_q)):
            i1 = min(i0 + block_q, Nq)
            q_i = qs[:, i0:i1]
            m = torch.full((B * H, i1 - i0), -_INF, dtype=wdt, device=q.device)
            l = torch.zeros_like(m)
            acc = torch.zeros(B * H, i1 - i0, Dv, dtype=wdt, device=q.device)
            # Causal: keys j >= i1 are in the future of every row of this block; skip them.
            for bj, j0 in enumerate(range(0, min(Nk, i1) if is_causal else Nk, block_k)):
                j1 = min(j0 + block_k, Nk)
                S = _scores(ctx, mask, q_i, k3[:, j0:j1], i0, i1, j0, j1, buf)
                m_new = torch.maximum(m, S.amax(dim=-1))
                # A row that has seen only -inf keeps m = -inf; subtract 0 instead so that
                # exp2(-inf - -inf) = NaN never happens (its P and alpha are then 0).
                m_safe = m_new.masked_fill(m_new == -_INF, 0.0)
                alpha = torch.exp2(m - m_safe)  # rescales what was summed under the old max
                P = S.sub_(m_safe.unsqueeze(-1)).exp2_()
                l = l.mul_(alpha).add_(P.sum(dim=-1))
                if dropout_p > 0:
                    P.mul_(_keep(ctx, P.shape, bi, bj, q.device))
                acc.mul_(alpha.unsqueeze(-1)).baddbmm_(P, v3[:, j0:j1])
                m = m_new
            dead = l == 0  # no key allowed: output 0, and L = +inf makes backward's P = 0
            O[:, i0:i1] = acc.div_(l.masked_fill(dead, 1.0).unsqueeze(-1))
            L[:, i0:i1] = torch.where(dead, _INF, m + torch.log2(l))
        out = O.view(B, H, Nq, Dv).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, L, attn_mask)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, L, attn_mask = ctx.saved_tensors
        mask = _blocked(attn_mask)
        B, H, Nq, D = q.shape
        Nk, Dv = k.shape[2], v.shape[3]
        wdt, bq, bk = ctx.wdt, ctx.bq, ctx.bk
        qs = q.reshape(B * H, Nq, D).to(wdt) * (ctx.scale * LOG2E)
        k3 = k.reshape(B * H, Nk, D).to(wdt)
        v3 = v.reshape(B * H, Nk, Dv).to(wdt)
        dO = dout.reshape(B * H, Nq, Dv).to(wdt)
        Dr = (dO * out.reshape(B * H, Nq, Dv).to(wdt)).sum(-1)  # D_i = rowsum(dO * O)
        dq = torch.zeros(B * H, Nq, D, dtype=wdt, device=q.device)
        # dK and dV are accumulated transposed, (D, Nk): Q_i^T dS_ij runs ~20% faster on
        # CPU than dS_ij^T Q_i, whose big operand would be read transposed.
        dkT = torch.zeros(B * H, D, Nk, dtype=wdt, device=q.device)
        dvT = torch.zeros(B * H, Dv, Nk, dtype=wdt, device=q.device)
        want_dmask = ctx.needs_input_grad[3]
        dmask = torch.zeros(attn_mask.shape, dtype=wdt, device=q.device) if want_dmask else None
        buf_S, buf_dP = (torch.empty(B * H * bq * bk, dtype=wdt, device=q.device) for _ in "SP")
        for bj, j0 in enumerate(range(0, Nk, bk)):
            j1 = min(j0 + bk, Nk)
            k_j, v_j = k3[:, j0:j1], v3[:, j0:j1]
            dkT_j, dvT_j = dkT[:, :, j0:j1], dvT[:, :, j0:j1]
            # Causal: query blocks ending at or before j0 see none of these keys; skip them.
            first = (j0 // bq) * bq if ctx.is_causal else 0
            for bi, i0 in enumerate(range(first, Nq, bq), start=first // bq):
                i1 = min(i0 + bq, Nq)
                S = _scores(ctx, mask, qs[:, i0:i1], k_j, i0, i1, j0, j1, buf_S)
                P = S.sub_(L[:, i0:i1].unsqueeze(-1)).exp2_()  # normalised weights, exact
                dO_i = dO[:, i0:i1]
                dP = torch.bmm(dO_i, v_j.transpose(1, 2), out=_tile(buf_dP, *P.shape))
                if ctx.dropout_p > 0:
                    Z = _keep(ctx, P.shape, bi, bj, q.device)
                    dvT_j.baddbmm_(dO_i.transpose(1, 2), P * Z)
                    dP.mul_(Z)  # dO flows only through kept weights
                else:
                    dvT_j.baddbmm_(dO_i.transpose(1, 2), P)
                dS = dP.sub_(Dr[:, i0:i1].unsqueeze(-1)).mul_(P)  # softmax backward
                dq[:, i0:i1].baddbmm_(dS, k_j)
                dkT_j.baddbmm_(qs[:, i0:i1].transpose(1, 2), dS)
                if want_dmask:  # the mask is added to S, so dM = dS summed over broadcasts
                    tile = slice_mask(dmask, i0, i1, j0, j1)
                    tile.add_(dS.view(B, H, i1 - i0, j1 - j0).sum_to_size(tile.shape))
        # Scale factors left out of the loop: S = scale q k^T, and qs carries scale*log2(e).
        dq.mul_(ctx.scale)
        dk = dkT.mul_(LN2).transpose(1, 2).reshape(B, H, Nk, D)
        dv = dvT.transpose(1, 2).reshape(B, H, Nk, Dv)
        return (dq.view(B, H, Nq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                None if dmask is None else dmask.to(q.dtype),
                None, None, None, None, None)


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
