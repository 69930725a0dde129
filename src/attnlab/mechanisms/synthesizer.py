"""Synthesizer: attention weights synthesised without query-key dot products.

Tay et al. 2021 replace ``softmax(QK^T)`` by logits that no token pair computes together:

* **Dense** -- each token predicts its own row of logits with a two-layer MLP,

  .. math::

      B_i = F(X_i) = W_2\\, \\sigma_R(W_1 X_i + b_1) + b_2 \\in \\mathbb{R}^{\\ell},
      \\qquad Y = \\mathrm{softmax}(B)\\, G(X)

  with ``sigma_R`` the ReLU and ``ell = max_seq_len``; row ``i`` keeps its first ``Nk``
  logits (as in the Long Range Arena code, which slices ``[..., :length]``).
* **Random** -- one learned (or fixed) matrix ``R`` per head, shared by every input:
  ``Y = softmax(R) G(X)``, ``R[:Nq, :Nk]`` used for the inputs' lengths.
* **Factorized random** -- ``R = R_1 R_2^T`` with ``R_1, R_2 in R^{ell x k}`` (rank ``k``).

Mapping onto the contract. ``G(X)`` (the value projection) is the ``v`` handed in; the
dense synthesiser's ``X_i`` is the per-head query ``q_i`` (the surrounding multi-head
layer has already projected the model input per head, as LRA's ``dense_syn`` does),
and ``W_1, b_1, W_2, b_2`` are shared across heads. ``k`` is not used by any variant,
nor ``q`` by the random ones: their gradients are exactly zero (returned as zero tensors,
not ``None``, so training code that reads ``.grad`` keeps working). ``scale`` multiplies
the synthesised logits (default 1: the paper does not scale them); ``attn_mask`` is
added to them and ``is_causal`` keeps ``j <= i``, so masks act exactly as in dot-product
attention (fully masked rows give zeros, via :func:`attnlab.contract.masked_softmax`).

Cost. Every query still produces ``Nk`` logits: these mechanisms are *not*
sub-quadratic (``O(N^2)`` time and memory, like softmax attention); the survey lists them
as a different idea (no token-token interaction), not as a faster one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.contract import masked_softmax, merge_masks, work_dtype
from attnlab.mechanisms.base import Mechanism
from attnlab.registry import REQUIRED, HParam, Limit, Paper, register_mechanism
from attnlab.verify import causal_allowed, dense_softmax_f64, param_f64

__all__ = ["SynthesizerDense", "SynthesizerRandom", "SynthesizerFactorizedRandom"]

TAY_2021 = Paper(
    "Synthesizer: Rethinking Self-Attention in Transformer Models",
    "Yi Tay, Dara Bahri, Donald Metzler, Da-Cheng Juan, Zhe Zhao, Che Zheng",
    2021,
    "https://arxiv.org/abs/2005.00743",
)
_FLAGS = dict(family="synthesizer", exact=True, causal=True, arbitrary_mask=True, cross=True,
              returns_weights=True, half_precision=True, learnable=True)
_MAX_LEN = HParam("max_seq_len", int, REQUIRED, "longest Nq/Nk: the synthesised row length",
                  low=1)
_NUM_HEADS = HParam("num_heads", int, REQUIRED, "heads H (one random matrix per head)", low=1)


class _ZeroGradFor(torch.autograd.Function):
    """Identity on ``out``; gives the inputs it is handed an exact zero gradient.

    The synthesisers ignore ``k`` (and ``q``); without this their ``.grad`` would stay
    ``None``, which breaks code (and the generic contract tests) that reads it.
    """

    @staticmethod
    def forward(ctx, out, *unused):
        ctx.meta = [(u.shape, u.dtype, u.device) for u in unused]
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        zeros = [torch.zeros(s, dtype=d, device=dev) if need else None
                 for (s, d, dev), need in zip(ctx.meta, ctx.needs_input_grad[1:], strict=True)]
        return (grad, *zeros)


def _finish(out, unused):
    if torch.is_grad_enabled() and any(u.requires_grad for u in unused):
        return _ZeroGradFor.apply(out, *unused)
    return out


def _check_len(name: str, what: str, n: int, max_len: int) -> None:
    if n > max_len:
        raise ValueError(
            f"{name}: max_seq_len={max_len} must be >= {what}={n} (the synthesised rows "
            f"have max_seq_len entries); build it with max_seq_len >= {n}"
        )


def _softmax_apply(logits, v, attn_mask, is_causal, scale, dropout_p, need_weights):
    """softmax(logits * scale + M) V with the contract's masks; logits in the work dtype."""
    B, H, Nq, Nk = v.shape[0], v.shape[1], logits.shape[-2], logits.shape[-1]
    mask = merge_masks(attn_mask, is_causal, Nq, Nk, v.device)
    # The random synthesisers' weights are shared by the batch: expanded (a view) so that
    # dropout draws an independent mask per batch element and head, as SDPA does.
    p = masked_softmax(logits * scale, mask).expand(B, H, Nq, Nk)
    p_used = F.dropout(p, dropout_p) if dropout_p > 0 else p
    out = torch.matmul(p_used, v.to(p.dtype)).to(v.dtype)
    weights = p.to(v.dtype) if need_weights else None
    return out, weights


# ---------------------------------------------------------------- float64 references
# For the correctness gate (attnlab.verify): the synthesised logits written plainly from
# the module's weights, then softmax(logits * scale) V (scale None: the paper's 1).
def _reference(logits, v, scale, is_causal):
    allowed = causal_allowed(logits.shape[-2], logits.shape[-1]) if is_causal else None
    return dense_softmax_f64(logits * (1.0 if scale is None else scale), v, allowed)


def dense_reference(q, k, v, *, mech, scale, is_causal):
    """B_i = W_2 relu(W_1 q_i + b_1) + b_2, first Nk entries of each row."""
    W_1, b_1, W_2, b_2 = (param_f64(p) for p in (mech.W_1, mech.b_1, mech.W_2, mech.b_2))
    logits = torch.relu(q @ W_1.T + b_1) @ W_2.T + b_2                 # (B, H, Nq, L)
    return _reference(logits[..., : k.shape[-2]], v, scale, is_causal)


def random_reference(q, k, v, *, mech, scale, is_causal):
    """softmax(R[:Nq, :Nk]) V with R per head (or one shared by all heads)."""
    R = param_f64(mech.R)[:, : q.shape[-2], : k.shape[-2]]            # (H or 1, Nq, Nk)
    return _reference(R, v, scale, is_causal)


def factorized_reference(q, k, v, *, mech, scale, is_causal):
    """softmax(R_1 R_2^T) V, R_1, R_2 of shape (max_seq_len, rank) per head."""
    R_1, R_2 = param_f64(mech.R_1), param_f64(mech.R_2)
    R = R_1 @ R_2.transpose(-2, -1)
    return _reference(R[:, : q.shape[-2], : k.shape[-2]], v, scale, is_causal)


@register_mechanism(
    "synthesizer_dense",
    paper=TAY_2021,
    time="O(N^2 D) (N * min(N, max_seq_len) * hidden for the logits)",
    memory="O(N^2)",
    equation="B_i = W_2 relu(W_1 q_i + b_1) + b_2 in R^max_seq_len;  "
             "softmax(scale * B[:, :Nk] + M) V,  scale = 1",
    aliases=("dense_synthesizer",),
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, MLP-synthesised logits",
                reference=dense_reference),
    hparams=[
        HParam("head_dim", int, REQUIRED, "size D of each query head (the MLP's input)", low=1),
        _MAX_LEN,
        HParam("hidden", int, None, "hidden width of the MLP (None = head_dim)", low=1,
               nullable=True),
    ],
    **_FLAGS,
)
class SynthesizerDense(Mechanism):
    """Dense Synthesizer: each query predicts its own row of logits with a two-layer MLP.

    Symbols as in the paper (Tay et al. 2021, eq. 1-2): ``F(X_i) = W_2 sigma_R(W_1 X_i + b_1)
    + b_2`` with ``X_i`` the per-head query ``q_i`` here, ``W_1`` ``(hidden x D)``, ``W_2``
    ``(max_seq_len x hidden)``, shared by all heads; ``Y = softmax(B) V``. Only the first
    ``Nk`` rows of ``W_2`` are multiplied (the rest would be sliced away), so the cost is
    ``O(Nq Nk hidden)``. ``k`` is unused (zero gradient).
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        d, L = self.hp["head_dim"], self.hp["max_seq_len"]
        h = self.hp["hidden"] or d
        # LeCun-normal kernels and zero biases, as LRA's Dense layers.
        self.W_1 = nn.Parameter(torch.randn(h, d) / math.sqrt(d))
        self.b_1 = nn.Parameter(torch.zeros(h))
        self.W_2 = nn.Parameter(torch.randn(L, h) / math.sqrt(h))
        self.b_2 = nn.Parameter(torch.zeros(L))

    def default_scale(self, d: int) -> float:
        return 1.0

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        if q.shape[-1] != self.hp["head_dim"]:
            raise ValueError(
                f"synthesizer_dense: q head dim {q.shape[-1]} does not match "
                f"head_dim={self.hp['head_dim']} the module was built with"
            )
        Nk = k.shape[-2]
        _check_len("synthesizer_dense", "Nk", Nk, self.hp["max_seq_len"])
        wdt = work_dtype(q.dtype)
        W_1, b_1, W_2, b_2 = (p.to(wdt) for p in (self.W_1, self.b_1, self.W_2, self.b_2))
        hidden = F.relu(F.linear(q.to(wdt), W_1, b_1))        # (B, H, Nq, hidden)
        logits = F.linear(hidden, W_2[:Nk], b_2[:Nk])          # (B, H, Nq, Nk) = B[:, :Nk]
        out, w = _softmax_apply(logits, v, attn_mask, is_causal, scale, dropout_p,
                                need_weights)
        return _finish(out, (k,)), w


class _RandomBase(Mechanism):
    """Shared forward of the random synthesisers: ``softmax(R[:Nq, :Nk] * scale + M) V``."""

    def default_scale(self, d: int) -> float:
        return 1.0

    def _store(self, name: str, value: torch.Tensor) -> None:
        # trainable=False keeps R fixed (the paper's "Fixed Random"): a buffer, not a param.
        if self.hp["trainable"]:
            setattr(self, name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def _heads(self) -> int:
        return self.hp["num_heads"] if self.hp["per_head"] else 1

    def _matrix(self, nq: int, nk: int, dtype) -> torch.Tensor:
        raise NotImplementedError

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        name, H = self.spec.name, q.shape[1]
        if self.hp["per_head"] and H != self.hp["num_heads"]:
            raise ValueError(
                f"{name}: num_heads={self.hp['num_heads']} (one matrix per head) does not "
                f"match the H={H} heads of q; build it with num_heads={H} or per_head=False"
            )
        Nq, Nk = q.shape[-2], k.shape[-2]
        _check_len(name, "Nq", Nq, self.hp["max_seq_len"])
        _check_len(name, "Nk", Nk, self.hp["max_seq_len"])
        logits = self._matrix(Nq, Nk, work_dtype(q.dtype)).unsqueeze(0)  # (1, H or 1, Nq, Nk)
        out, w = _softmax_apply(logits, v, attn_mask, is_causal, scale, dropout_p,
                                need_weights)
        return _finish(out, (q, k)), w


_RANDOM_HPARAMS = [
    _NUM_HEADS,
    _MAX_LEN,
    HParam("per_head", bool, True, "one matrix per head (False: one shared by all heads)"),
    HParam("trainable", bool, True, "learn R (False: the paper's fixed random synthesizer; "
           "R is then a buffer and the module has no parameters)"),
]


@register_mechanism(
    "synthesizer_random",
    paper=TAY_2021,
    time="O(N^2 D)",
    memory="O(N^2)",
    equation="softmax(scale * R[:Nq, :Nk] + M) V,  R in R^(H x max_seq_len x max_seq_len), "
             "scale = 1",
    aliases=("random_synthesizer",),
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, softmax(R) V",
                reference=random_reference),
    hparams=_RANDOM_HPARAMS,
    **_FLAGS,
)
class SynthesizerRandom(_RandomBase):
    """Random Synthesizer: input-independent weights softmax(R) V, R learned per head.

    ``R`` (``H x max_seq_len x max_seq_len``, or ``1 x ...`` with ``per_head=False``) is
    drawn from ``N(0, 1/max_seq_len)`` (LeCun normal, as LRA) and, with ``trainable=True``
    (default), learned. ``q`` and ``k`` are unused (zero gradient). With
    ``trainable=False`` the module owns no parameters although the registry lists the
    mechanism as learnable (the flag is static and describes the default).
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        L = self.hp["max_seq_len"]
        self._store("R", torch.randn(self._heads(), L, L) / math.sqrt(L))

    def _matrix(self, nq, nk, dtype):
        return self.R[:, :nq, :nk].to(dtype)


@register_mechanism(
    "synthesizer_factorized_random",
    paper=TAY_2021,
    time="O(N^2 (D + k))",
    memory="O(N^2)",
    equation="softmax(scale * (R_1 R_2^T)[:Nq, :Nk] + M) V,  R_1, R_2 in R^(max_seq_len x k) "
             "per head, scale = 1",
    aliases=("factorized_random_synthesizer",),
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, softmax(R_1 R_2^T) V",
                reference=factorized_reference),
    hparams=[*_RANDOM_HPARAMS,
             HParam("rank", int, 8, "k, the rank of R = R_1 R_2^T", low=1)],
    tiny_hparams={"rank": 2},
    **_FLAGS,
)
class SynthesizerFactorizedRandom(_RandomBase):
    """Factorized Random Synthesizer: R = R_1 R_2^T of rank k, softmax(R) V.

    ``R_1, R_2`` are ``max_seq_len x k`` per head (``N(0, 1/k)``, so entries of ``R`` have
    unit variance): ``2 k max_seq_len`` parameters per head instead of ``max_seq_len^2``.
    Only ``R_1[:Nq] R_2[:Nk]^T`` is formed.
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        L, r = self.hp["max_seq_len"], self.hp["rank"]
        self._store("R_1", torch.randn(self._heads(), L, r) / math.sqrt(math.sqrt(r)))
        self._store("R_2", torch.randn(self._heads(), L, r) / math.sqrt(math.sqrt(r)))

    def _matrix(self, nq, nk, dtype):
        return self.R_1[:, :nq].to(dtype) @ self.R_2[:, :nk].to(dtype).transpose(-2, -1)
