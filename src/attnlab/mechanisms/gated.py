"""Gated Attention Unit (GAU): squared-ReLU attention gated by a GLU-style branch.

Hua et al. 2022 ("Transformer Quality in Linear Time", FLASH) replace softmax multi-head
attention and the feed-forward layer by one unit (their eq. 1-4 and Code 1):

.. math::

    U = \\phi_u(X W_u), \\quad V = \\phi_v(X W_v), \\quad Z = \\phi_z(X W_z) \\in
    \\mathbb{R}^{T \\times s}, \\qquad Q = \\gamma_q \\odot Z + \\beta_q, \\quad
    K = \\gamma_k \\odot Z + \\beta_k,

    A = \\mathrm{relu}^2\\!\\left(\\frac{Q K^\\top}{n} + b\\right), \\qquad
    O = (U \\odot A V)\\, W_o

with ``phi = SiLU``, ``b`` a relative-position bias and ``n`` the sequence length: Code 1
computes ``square(relu(qk / seq_len + bias))``, so the ``1/n`` sits *inside* the square.

Mapping onto the (q, k, v) contract, per head:

* ``Z`` of the queries is ``phi(q)`` and ``Z`` of the keys ``phi(k)``: the layer's query and
  key projections both play ``X W_z`` (one shared ``W_z`` in self-attention with tied
  projections; separate ones also allow cross-attention, ``Nq != Nk``);
* ``gamma, beta`` (``2 x D``: row 0 for ``Q``, row 1 for ``K``) are per-dimension scales
  and offsets, ``beta = 0`` at first. ``gamma`` starts at 1 (``init="identity"``, the
  default); ``init="paper"`` draws Code 1's ``N(0, 0.02^2)``. Code 1's start relies on its
  bias ``b``: without one, ``A`` scales as ``gamma^4`` and the outputs start near 1e-8
  (D = 16..64, N = 64..512), under float16's smallest subnormal (6e-8): a float16 layer
  would start at exactly zero;
* ``V = phi(v)``: ``v`` is ``X W_v``;
* ``U = phi(q W_u)`` with one learnable ``W_u`` (``D x Dv``) shared by every head, as the
  classic learnable scores are (:mod:`attnlab.mechanisms.classic`): the contract hands
  only ``q, k, v``, and ``q`` is the query token's projection. ``gate=False`` fixes
  ``U = 1``, leaving the attention ``A V`` alone. ``W_o`` is the layer's ``out_proj``.

Normalisation: ``n = Nk``, the number of keys handed in, for every row, causal rows too
(Code 1 divides by ``seq_len`` whatever the mask; padded keys count, as the padded length
did there). ``scale`` (default 1) multiplies ``Q K^T / n``. A float ``attn_mask`` is the
paper's additive bias ``b`` (inside ``relu^2``; ``-inf`` gives an exact 0); a bool mask
and ``is_causal`` zero ``A`` where a pair is not allowed. There is no softmax, so rows
need no normalising and a fully masked row is simply zeros. ``need_weights`` returns
``A`` (before the gate; dropout, if any, is applied to ``A`` in the product only).

Half precision computes in float32 and returns the input dtype; a float16 result beyond
float16's range (``relu^2`` is unbounded) raises rather than returning inf.

Cost: ``A`` is ``(Nq, Nk)``: O(N^2) time and memory, as the paper's quadratic GAU. FLASH's
chunked linear form (quadratic attention within chunks of size ``c``, linear attention
across them) is a different mechanism and not implemented here. Not ``kv_cache``: ``1/n``
changes as keys are appended, so decoding would not equal the causal forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.contract import merge_masks, work_dtype
from attnlab.mechanisms.base import Mechanism
from attnlab.registry import REQUIRED, HParam, Limit, Paper, register_mechanism
from attnlab.verify import causal_allowed, param_f64

__all__ = ["GatedAttentionUnit", "gau_reference"]

HUA_2022 = Paper(
    "Transformer Quality in Linear Time",
    "Weizhe Hua, Zihang Dai, Hanxiao Liu, Quoc V. Le",
    2022,
    "https://arxiv.org/abs/2202.10447",
)

_PHI = {"silu": F.silu, "identity": lambda x: x}
_GAMMA_STD = 0.02  # Code 1: tf.random_normal_initializer(stddev=0.02)


# ---------------------------------------------------------------- float64 reference
def gau_reference(q, k, v, *, mech, scale, is_causal):
    """The GAU of the module's parameters written plainly in float64: SiLU as
    ``x / (1 + exp(-x))``, ``relu^2`` as ``max(x, 0)^2``, the masks as multiplications."""
    def phi(x):
        return x / (1.0 + torch.exp(-x)) if mech.hp["activation"] == "silu" else x

    gamma, beta = param_f64(mech.gamma), param_f64(mech.beta)
    Q = phi(q) * gamma[0] + beta[0]
    K = phi(k) * gamma[1] + beta[1]
    s = 1.0 if scale is None else scale
    A = torch.clamp(s * (Q @ K.transpose(-2, -1)) / k.shape[-2], min=0.0) ** 2
    if is_causal:
        A = A * causal_allowed(q.shape[-2], k.shape[-2])
    out = A @ phi(v)
    if mech.hp["gate"]:
        out = phi(q @ param_f64(mech.W_u)) * out
    return out


@register_mechanism(
    "gau",
    family="gated",
    paper=HUA_2022,
    time="O(N^2 (D + Dv) + N D Dv)",
    memory="O(N^2)",
    equation="U = phi(q W_u), Q = gamma_q * phi(q) + beta_q, K = gamma_k * phi(k) + beta_k;  "
             "A = relu(scale * Q K^T / Nk + M)^2;  out = U * (A phi(v)),  scale = 1",
    aliases=("gated_attention_unit",),
    exact=True,
    causal=True,
    arbitrary_mask=True,
    cross=True,
    returns_weights=True,
    learnable=True,
    hparams=[
        HParam("head_dim", int, REQUIRED, "size D of each query/key head", low=1),
        HParam("value_dim", int, None, "size Dv of each value head, the gate's width "
               "(None = head_dim)", low=1, nullable=True),
        HParam("gate", bool, True, "gate the output with U = phi(q W_u) (False: U = 1)"),
        HParam("activation", str, "silu", "phi, applied to q, k, v and q W_u (the paper's "
               "SiLU, or identity)", choices=("silu", "identity")),
        HParam("init", str, "identity", "initial gamma: 'identity' 1, 'paper' N(0, 0.02^2) "
               "as Code 1 (beta = 0 in both)", choices=("identity", "paper")),
    ],
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, U * relu^2(QK^T/n) V",
                reference=gau_reference),
)
class GatedAttentionUnit(Mechanism):
    """Gated Attention Unit: out = U * (relu^2(Q K^T / n) V), Q and K per-dim scalings of Z.

    Symbols as in Hua et al. 2022 (see the module docstring for the mapping onto
    ``q, k, v``). Parameters, shared by every head: ``gamma``, ``beta`` ``(2, D)`` and,
    with ``gate=True``, ``W_u`` ``(D, Dv)``.
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        d = self.hp["head_dim"]
        dv = self.hp["value_dim"] or d
        if self.hp["init"] == "paper":
            gamma = torch.randn(2, d) * _GAMMA_STD
        else:
            gamma = torch.ones(2, d)
        self.gamma = nn.Parameter(gamma)
        self.beta = nn.Parameter(torch.zeros(2, d))
        if self.hp["gate"]:
            self.W_u = nn.Parameter(torch.empty(d, dv))
            nn.init.xavier_uniform_(self.W_u)

    def default_scale(self, d: int) -> float:
        return 1.0  # the paper's 1/n is part of the formula, not of the scale

    def _check_dims(self, q, v) -> None:
        d = self.hp["head_dim"]
        if q.shape[-1] != d:
            raise ValueError(f"gau: q head dim {q.shape[-1]} does not match head_dim={d} the "
                             f"module was built with; create it with head_dim={q.shape[-1]}")
        dv = self.hp["value_dim"] or d
        if self.hp["gate"] and v.shape[-1] != dv:
            raise ValueError(f"gau: v head dim {v.shape[-1]} does not match the gate's width "
                             f"value_dim={dv} (W_u is {d} x {dv}); create it with "
                             f"value_dim={v.shape[-1]}")

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        self._check_dims(q, v)
        dtype, work = q.dtype, work_dtype(q.dtype)  # relu^2 of float16 scores overflows
        phi = _PHI[self.hp["activation"]]
        q, k, v = q.to(work), k.to(work), v.to(work)
        gamma, beta = self.gamma.to(work), self.beta.to(work)
        Q = phi(q) * gamma[0] + beta[0]
        K = phi(k) * gamma[1] + beta[1]
        nq, nk = q.shape[-2], k.shape[-2]
        # scale / n on Q: the (Nq, Nk) product is formed once, already normalised.
        scores = torch.matmul(Q * (scale / nk), K.transpose(-2, -1))
        mask = merge_masks(attn_mask, is_causal, nq, nk, q.device)
        if mask is not None and mask.dtype != torch.bool:
            scores = scores + mask.to(work)  # the paper's additive bias b; -inf -> 0
        A = torch.relu(scores).square()
        if mask is not None and mask.dtype == torch.bool:
            # where, not a product: a masked pair's gradient is exactly 0, never inf * 0.
            A = torch.where(mask, A, A.new_zeros(()))
        A_used = F.dropout(A, dropout_p) if dropout_p > 0 else A
        out = torch.matmul(A_used, phi(v))
        if self.hp["gate"]:
            out = phi(q @ self.W_u.to(work)) * out
        if dtype == torch.float16:
            _check_float16_range(out, A if need_weights else None)
        return out.to(dtype), (A.to(dtype) if need_weights else None)


def _check_float16_range(out: torch.Tensor, A: torch.Tensor | None) -> None:
    """A clear error rather than inf: ``relu^2`` is unbounded (no softmax caps it), so the
    float32 result can exceed float16's range (65504) where softmax attention's cannot."""
    top = max(float(t.detach().abs().max()) for t in (out, A) if t is not None)
    limit = torch.finfo(torch.float16).max
    if top > limit:
        raise ValueError(f"gau: the result overflows torch.float16 (max |value| {top:.3g} > "
                         f"{limit:.0f}: relu^2 scores are unbounded); use torch.bfloat16 or "
                         f"torch.float32, or a smaller scale")
