"""Two modern variants of softmax attention: sigmoid attention and differential attention.

* ``sigmoid`` -- Ramapuram et al. 2024, "Theory, Analysis, and Best Practices for Sigmoid
  Self-Attention": the row softmax is replaced by an elementwise sigmoid with a bias,

  .. math::

      \\mathrm{SigmoidAttn}(X) = \\sigma\\!\\left(\\frac{Q K^\\top}{\\sqrt{d}} + b\\right) V,
      \\qquad b = -\\log n .

  No row is normalised: each pair's weight depends on ``q_i . k_j`` alone. The paper's
  ``b = -log(n)`` (``n`` the sequence length) keeps ``sum_j sigma(.)`` near 1 at
  initialisation; here ``b`` is fixed when the module is built (``bias``, or
  ``-log(max_seq_len)`` with ``max_seq_len`` the layer's context length, filled in by
  ``create_for`` and ``MultiheadAttention``; :data:`DEFAULT_CONTEXT` = 1024 when none
  says it), never read off a call's ``Nk``: with a per-call ``-log(Nk)``, causal row ``i``
  decoded over its ``i + 1`` cached keys would get another ``b`` than in the full forward.
  With a fixed ``b`` one query attending every cached key *is* its causal row, so KV-cache
  decoding equals the causal forward. A masked pair contributes exactly 0 (bool mask,
  ``is_causal``, or a float mask's ``-inf``: ``sigma(-inf) = 0``); a float mask is added
  to the logits; a fully masked row is zeros.

  Memory: queries are taken ``chunk_size`` at a time, forward *and* backward (a custom
  autograd function recomputes each chunk's ``sigma`` in backward instead of keeping it,
  as FlashSigmoid does with tiles), so no ``(Nq, Nk)`` tensor exists: ``O(N (D + Dv) +
  chunk N)``. Causal chunks stop at their last allowed key. ``need_weights`` (the
  ``(Nq, Nk)`` sigmoid matrix), attention dropout and a float mask that requires grad run
  through plain autograd over the same chunks, which keeps every chunk's ``sigma``
  (O(N^2) saved, as any dense attention).

* ``differential`` -- Ye et al. 2024, "Differential Transformer": the difference of two
  softmax maps cancels common-mode attention noise,

  .. math::

      \\mathrm{DiffAttn}(X) = \\left(\\mathrm{softmax}\\!\\left(\\frac{Q_1 K_1^\\top}
      {\\sqrt{d}}\\right) - \\lambda\\, \\mathrm{softmax}\\!\\left(\\frac{Q_2 K_2^\\top}
      {\\sqrt{d}}\\right)\\right) V, \\qquad
      \\lambda = e^{\\lambda_{q1} \\cdot \\lambda_{k1}} - e^{\\lambda_{q2} \\cdot \\lambda_{k2}}
      + \\lambda_{init},

  with ``[Q_1; Q_2] = q`` and ``[K_1; K_2] = k`` split along the head dim (``d = D / 2``
  each, so ``scale`` defaults to ``1/sqrt(D/2)``, as the authors' code), ``lambda_init =
  0.8 - 0.6 exp(-0.3 (l - 1))`` for layer ``l`` (``layer_index``, 1-based as in the paper;
  or ``lambda_init`` given). Each head's output then goes through the paper's headwise
  normalisation (eq. 3): ``(1 - lambda_init) RMSNorm(DiffAttn)``, an RMSNorm over the
  ``Dv`` features of each row with a learnable weight (shared by the heads, as the
  authors' ``subln``); ``norm=False`` leaves the bare ``DiffAttn`` map. ``lambda_q1 ..
  lambda_k2`` (size ``d``) start at ``N(0, 0.1^2)`` as there, and are shared by the heads
  (one ``lambda`` per layer). ``attn_mask`` and ``is_causal`` apply to both softmaxes.
  The two softmaxes are two calls of ``F.scaled_dot_product_attention`` (its fused
  kernels' memory; ``A V`` is linear in the map, so ``P_1 V - lambda P_2 V`` is the
  same), on ``Q_i, K_i, V`` zero-padded to one head size (``D/2`` against ``Dv = D``:
  PyTorch's fused CPU kernel takes only equal sizes, and would fall back to forming the
  scores); ``need_weights`` (the differential map ``P_1 - lambda P_2``, before the norm) and
  attention dropout (one dropout mask on the differential map, as the authors' code)
  form both maps densely.

Both compute half-precision inputs in float32 and return the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.contract import masked_softmax, merge_masks, slice_mask, work_dtype
from attnlab.mechanisms.base import Mechanism
from attnlab.registry import REQUIRED, HParam, Limit, Paper, register_mechanism
from attnlab.verify import causal_allowed, dense_softmax_f64, param_f64

__all__ = ["DifferentialAttention", "SigmoidAttention", "SigmoidAttentionFunction",
           "differential_reference", "sigmoid_reference"]

RAMAPURAM_2024 = Paper(
    "Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
    "Jason Ramapuram, Federico Danieli, Eeshan Dhekane, Floris Weers, Dan Busbridge, "
    "Pierre Ablin, Tatiana Likhomanenko, Jagrit Digani, Zijin Gu, Amitis Shidani, Russ Webb",
    2024,
    "https://arxiv.org/abs/2409.04431",
)
YE_2024 = Paper(
    "Differential Transformer",
    "Tianzhu Ye, Li Dong, Yuqing Xia, Yutao Sun, Yi Zhu, Gao Huang, Furu Wei",
    2024,
    "https://arxiv.org/abs/2410.05258",
)
_FLAGS = dict(family="softmax_variants", exact=False, causal=True, arbitrary_mask=True,
              cross=True, returns_weights=True, kv_cache=True, half_precision=True)
# The n of b = -log(n) when the layer does not say its context length.
DEFAULT_CONTEXT = 1024


# ---------------------------------------------------------------- float64 references
def sigmoid_reference(q, k, v, *, mech, scale, is_causal):
    """``sigma(q k^T * scale + b) V`` in float64, ``sigma(x) = 1 / (1 + exp(-x))``, the
    causal pairs multiplied by 0; ``b`` from the module's hyperparameters."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    b = mech.hp["bias"]
    b = -math.log(mech.hp["max_seq_len"]) if b is None else b
    w = 1.0 / (1.0 + torch.exp(-(q.double() @ k.double().transpose(-2, -1) * s + b)))
    if is_causal:
        w = w * causal_allowed(q.shape[-2], k.shape[-2])
    return w @ v.double()


def differential_reference(q, k, v, *, mech, scale, is_causal):
    """The module's DiffAttn, with its own lambda and norm, written plainly in float64."""
    d = q.shape[-1] // 2
    s = d ** -0.5 if scale is None else scale
    allowed = causal_allowed(q.shape[-2], k.shape[-2]) if is_causal else None
    q, k = q.double(), k.double()
    lq1, lk1, lq2, lk2 = (param_f64(getattr(mech, f"lambda_{n}"))
                          for n in ("q1", "k1", "q2", "k2"))
    lam_init = mech.hp["lambda_init"]
    if lam_init is None:
        lam_init = 0.8 - 0.6 * math.exp(-0.3 * (mech.hp["layer_index"] - 1))
    lam = torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + lam_init
    o1 = dense_softmax_f64(q[..., :d] @ k[..., :d].transpose(-2, -1) * s, v, allowed)
    o2 = dense_softmax_f64(q[..., d:] @ k[..., d:].transpose(-2, -1) * s, v, allowed)
    out = o1 - lam * o2
    if not mech.hp["norm"]:
        return out
    rms = torch.sqrt((out * out).mean(dim=-1, keepdim=True) + mech.hp["eps"])
    return (1.0 - lam_init) * out / rms * param_f64(mech.norm_weight)


# ---------------------------------------------------------------- sigmoid attention
def _sigmoid_chunk(q, k, mask, causal: bool, scale: float, b: float, i0: int, i1: int,
                   nk: int) -> torch.Tensor:
    """``sigma(q_i . k_j * scale + b + M_ij)`` for rows ``i0:i1`` and keys ``:nk``, 0 at
    every pair a bool mask or ``is_causal`` removes (a float mask is in the logits)."""
    logits = torch.matmul(q[..., i0:i1, :] * scale, k[..., :nk, :].transpose(-2, -1)) + b
    allowed = None
    if mask is not None:
        m = slice_mask(mask, i0, i1, 0, nk)
        if mask.dtype == torch.bool:
            allowed = m
        else:
            logits = logits + m
    w = torch.sigmoid(logits)
    if causal:  # key j <= query i, rows i0 .. i1-1
        c = torch.ones(i1 - i0, nk, dtype=torch.bool, device=q.device).tril(i0)
        allowed = c if allowed is None else allowed & c
    # where, not a product: a masked pair has exactly 0 weight and 0 gradient.
    return w if allowed is None else torch.where(allowed, w, w.new_zeros(()))


def _chunks(nq: int, nk: int, chunk: int, causal: bool):
    """``(i0, i1, keys)``: query rows and the keys they need (causal: up to the last row)."""
    for i0 in range(0, nq, chunk):
        i1 = min(i0 + chunk, nq)
        yield i0, i1, min(i1, nk) if causal else nk


class SigmoidAttentionFunction(torch.autograd.Function):
    """``sigma(q k^T * scale + b + M) v`` a query chunk at a time, backward recomputing each
    chunk's ``sigma`` (only ``q, k, v`` and the mask are saved). With ``W = sigma(L)``:
    ``dV = W^T dO``, ``dL = (dO V^T) * W (1 - W)`` (0 at masked pairs, where ``W = 0``),
    ``dQ = scale dL K``, ``dK = scale dL^T Q``."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal: bool, scale: float, b: float, chunk: int):
        nq, nk = q.shape[-2], k.shape[-2]
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        for i0, i1, n in _chunks(nq, nk, chunk, causal):
            w = _sigmoid_chunk(q, k, mask, causal, scale, b, i0, i1, n)
            out[..., i0:i1, :] = torch.matmul(w, v[..., :n, :])
        ctx.save_for_backward(q, k, v, mask)
        ctx.args = (causal, scale, b, chunk)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mask = ctx.saved_tensors
        causal, scale, b, chunk = ctx.args
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for i0, i1, n in _chunks(q.shape[-2], k.shape[-2], chunk, causal):
            w = _sigmoid_chunk(q, k, mask, causal, scale, b, i0, i1, n)
            do = dout[..., i0:i1, :]
            dv[..., :n, :] += torch.matmul(w.transpose(-2, -1), do)
            dl = torch.matmul(do, v[..., :n, :].transpose(-2, -1)) * (w * (1.0 - w))
            dq[..., i0:i1, :] = torch.matmul(dl, k[..., :n, :]) * scale
            dk[..., :n, :] += torch.matmul(dl.transpose(-2, -1), q[..., i0:i1, :]) * scale
        return dq, dk, dv, None, None, None, None, None


@register_mechanism(
    "sigmoid",
    paper=RAMAPURAM_2024,
    time="O(N^2 D)",
    memory="O(N (D + Dv) + chunk N)",
    equation="sigma(Q K^T * scale + b + M) V,  b = -log(n),  scale = 1/sqrt(d)  "
             "(elementwise: no row normalisation)",
    aliases=("sigmoid_attention",),
    hparams=[
        HParam("bias", float, None, "b added to every logit (None: -log(max_seq_len))",
               nullable=True),
        HParam("max_seq_len", int, DEFAULT_CONTEXT, "n of b = -log(n): the context length, "
               "fixed at construction so that decoding equals the causal forward", low=1),
        HParam("chunk_size", int, 128, "queries per chunk (bounds the (chunk, Nk) tensor)",
               low=1),
    ],
    tiny_hparams={"chunk_size": 4},
    limit=Limit(hparams=lambda n: {}, note="not softmax: its own formula, "
                "sigma(QK^T/sqrt(d) - log n) V, rows unnormalised", reference=sigmoid_reference),
    **_FLAGS,
)
class SigmoidAttention(Mechanism):
    """Sigmoid attention: sigma(QK^T/sqrt(d) + b) V with b = -log(n), rows not normalised."""

    @property
    def b(self) -> float:
        """The bias ``b`` of every logit: ``bias``, else ``-log(max_seq_len)``."""
        b = self.hp["bias"]
        return -math.log(self.hp["max_seq_len"]) if b is None else b

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        dtype, work = q.dtype, work_dtype(q.dtype)  # float16 q . k overflows past 65504
        q, k, v = q.to(work), k.to(work), v.to(work)
        mask = attn_mask
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(work)
        chunk = self.hp["chunk_size"]
        dense = need_weights or dropout_p > 0 or (
            mask is not None and mask.requires_grad and torch.is_grad_enabled())
        if not dense:
            out = SigmoidAttentionFunction.apply(q, k, v, mask, is_causal, scale, self.b, chunk)
            return out.to(dtype), None
        nk, outs, weights = k.shape[-2], [], []
        for i0, i1, _ in _chunks(q.shape[-2], nk, chunk, False):  # full rows: the weights
            w = _sigmoid_chunk(q, k, mask, is_causal, scale, self.b, i0, i1, nk)
            outs.append(torch.matmul(F.dropout(w, dropout_p) if dropout_p > 0 else w, v))
            weights.append(w)
        out = torch.cat(outs, dim=-2).to(dtype)
        return out, (torch.cat(weights, dim=-2).to(dtype) if need_weights else None)


# ---------------------------------------------------------------- differential attention
@register_mechanism(
    "differential",
    paper=YE_2024,
    time="O(N^2 D)",
    memory="O(N) (two fused SDPA calls)",
    equation="(1 - lambda_init) RMSNorm((softmax(Q1 K1^T * scale + M) - lambda softmax(Q2 K2^T "
             "* scale + M)) V),  lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,  "
             "scale = 1/sqrt(D/2)",
    aliases=("diff_attention",),
    learnable=True,
    flops="differential_attention",  # a profiler counts the zero-padded heads' matmuls
    hparams=[
        HParam("head_dim", int, REQUIRED, "size D of each query/key head (even: Q and K split "
               "into halves Q1, Q2 of D / 2)", low=2, multiple_of=2),
        HParam("value_dim", int, None, "size Dv of each value head, the norm's width "
               "(None = head_dim)", low=1, nullable=True),
        HParam("layer_index", int, 1, "l of lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)) "
               "(1 = the first layer)", low=1),
        HParam("lambda_init", float, None, "lambda_init itself (None: from layer_index)",
               low=0.0, high=1.0, nullable=True),
        HParam("norm", bool, True, "the paper's headwise (1 - lambda_init) RMSNorm of the "
               "output (False: the bare DiffAttn map times V)"),
        HParam("eps", float, 1e-5, "RMSNorm's epsilon", low=0.0, low_exclusive=True),
    ],
    limit=Limit(hparams=lambda n: {}, note="not softmax: its own formula, (1 - lambda_init) "
                "RMSNorm((P1 - lambda P2) V)", reference=differential_reference),
    **_FLAGS,
)
class DifferentialAttention(Mechanism):
    """Differential attention: (softmax(Q1 K1^T/sqrt(d)) - lambda softmax(Q2 K2^T/sqrt(d))) V,
    then the headwise (1 - lambda_init) RMSNorm."""

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        D = self.hp["head_dim"]
        lam = self.hp["lambda_init"]
        self.lambda_init = (0.8 - 0.6 * math.exp(-0.3 * (self.hp["layer_index"] - 1))
                            if lam is None else lam)
        for name in ("q1", "k1", "q2", "k2"):  # the authors' init: N(0, 0.1^2)
            setattr(self, f"lambda_{name}", nn.Parameter(torch.randn(D // 2) * 0.1))
        self.norm_weight = nn.Parameter(torch.ones(self.hp["value_dim"] or D))

    def default_scale(self, d: int) -> float:
        return (d / 2) ** -0.5  # d of the paper is each half's size

    def _check_dims(self, q, v) -> None:
        D = self.hp["head_dim"]
        if q.shape[-1] != D:
            raise ValueError(f"differential: q head dim {q.shape[-1]} does not match "
                             f"head_dim={D} the module was built with; create it with "
                             f"head_dim={q.shape[-1]}")
        dv = self.norm_weight.shape[0]
        if self.hp["norm"] and v.shape[-1] != dv:
            raise ValueError(f"differential: v head dim {v.shape[-1]} does not match the "
                             f"norm's width value_dim={dv}; create it with "
                             f"value_dim={v.shape[-1]}")

    def lam(self, dtype=torch.float32) -> torch.Tensor:
        """``lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init``."""
        lq1, lk1, lq2, lk2 = (getattr(self, f"lambda_{n}").to(dtype)
                              for n in ("q1", "k1", "q2", "k2"))
        return torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + self.lambda_init

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        self._check_dims(q, v)
        dtype, work = q.dtype, work_dtype(q.dtype)
        q, k, v = q.to(work), k.to(work), v.to(work)
        d, lam = q.shape[-1] // 2, self.lam(work)
        (q1, q2), (k1, k2) = (q[..., :d], q[..., d:]), (k[..., :d], k[..., d:])
        weights = None
        if need_weights or dropout_p > 0:  # the map itself (one dropout mask on it)
            mask = merge_masks(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.device)
            weights = (masked_softmax(torch.matmul(q1 * scale, k1.transpose(-2, -1)), mask)
                       - lam * masked_softmax(torch.matmul(q2 * scale, k2.transpose(-2, -1)),
                                              mask))
            used = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
            out = torch.matmul(used, v)
        else:
            out = self._fused(q1, k1, q2, k2, v, attn_mask, is_causal, scale, lam, work)
        if self.hp["norm"]:
            rms = torch.rsqrt(out.square().mean(dim=-1, keepdim=True) + self.hp["eps"])
            out = (1.0 - self.lambda_init) * out * rms * self.norm_weight.to(work)
        return out.to(dtype), (weights.to(dtype) if need_weights else None)

    @staticmethod
    def _fused(q1, k1, q2, k2, v, attn_mask, is_causal, scale, lam, work):
        """``P_1 V - lambda P_2 V`` with two SDPA calls (never the (Nq, Nk) maps)."""
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(work)
        if is_causal and attn_mask is not None:  # SDPA refuses both at once: fold them
            attn_mask = merge_masks(attn_mask, True, q1.shape[-2], k1.shape[-2], q1.device)
            is_causal = False
        # Zeros pad q, k and v to one head size (no score changes: the scale is explicit):
        # PyTorch's fused CPU kernel (flash) needs it, else SDPA forms the (Nq, Nk) scores.
        m, dv = max(q1.shape[-1], v.shape[-1]), v.shape[-1]
        q1, k1, q2, k2, v = (F.pad(t, (0, m - t.shape[-1])) for t in (q1, k1, q2, k2, v))
        o1, o2 = (F.scaled_dot_product_attention(a, b, v, attn_mask=attn_mask,
                                                 is_causal=is_causal, scale=scale)
                  for a, b in ((q1, k1), (q2, k2)))
        return (o1 - lam * o2)[..., :dv]
