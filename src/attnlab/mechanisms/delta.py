"""DeltaNet: linear attention whose fast-weight memory is written with the delta rule.

Schlag et al. 2021 read linear attention as a fast-weight memory ``S`` (written
``S += v k^T``, read ``o = S q``) and replaced the purely additive write by the delta
rule: the memory first *retrieves* what it holds for the key, ``S_{t-1} k_t``, and
replaces it by a ``beta_t``-mix of the new value. In the symbols of Yang et al. 2024:

.. math::

    S_t = S_{t-1} (I - \\beta_t k_t k_t^\\top) + \\beta_t v_t k_t^\\top, \\qquad
    o_t = S_t q_t

with ``k_t`` and ``q_t`` L2-normalised (Yang et al.'s choice: ``I - beta_t k_t k_t^T`` then
has eigenvalues 1 and ``1 - beta_t``, a memory that cannot blow up) and ``beta_t in (0, 1)``.
With ``beta_t = 1`` the write is an overwrite: ``S_t k_t = v_t`` exactly, whatever
``S_{t-1}`` stored under ``k_t``.

**Chunkwise form** (Yang et al. 2024, the WY/UT representation): with
``u_t = beta_t (v_t - S_{t-1} k_t)`` the recurrence is ``S_t = S_{t-1} + u_t k_t^T``. Inside
a chunk of ``C`` positions starting from state ``S``, the ``u`` solve a unit lower-
triangular system, ``(I + tril(diag(beta) K K^T, -1)) U' = diag(beta) (V - K S^T)``, so with

    T = (I + tril(diag(beta) K K^T, -1))^-1,  W = T diag(beta) K,  U = T diag(beta) V

``U' = U - W S^T`` (one ``torch.linalg.solve_triangular`` per chunk gives ``T``),
``O = Q S^T + tril(Q K^T) U'`` and ``S <- S + U'^T K``. Time ``O(N C D + N D Dv)``, memory
``O(N (C + D + Dv) + (N / C) D Dv)``: no ``N x N`` tensor; the last chunk is zero-padded
(a zero key and value write nothing). Gradients are autograd's, but for ``T``'s (a matmul
backward, :class:`_UnitLowerInverse`). The recurrent form
(:func:`recurrent_delta_rule`) serves decoding of a few tokens; a long prefill uses the
chunkwise form from the state. The state is kept as ``S^T`` ``(B, H, D, Dv)`` (fla's layout,
``o_t = S_t^T q_t`` there), in float32 for half-precision inputs.

**Adaptations to the (q, k, v) contract** (the papers project ``beta`` from the layer's input
``x_t``, ``beta_t = sigmoid(W_beta x_t)``, which the contract does not hand a mechanism):

* ``beta_t = sigmoid(w_h . k_t + b_h)`` from the *un-normalised* key ``k_t`` (a linear
  function of ``x_t`` in a layer, so the same family of gates up to the projection), with
  learned ``w_h`` ``(head_dim)`` and ``b_h`` per head (``w`` initialised as ``nn.Linear``'s
  weight, ``U(-1/sqrt(D), 1/sqrt(D))``, ``b = 0``).
* ``scale`` (default ``D^-1/2``, as fla's ``delta_rule`` ops) multiplies the normalised
  query: ``o_t = S_t (scale q_t / |q_t|)``.

**Non-causal form** (the papers are causal only): the two directions' delta-rule outputs
summed with the diagonal counted once, as Hydra (Hwang et al. 2024) does for SSMs. Writing
the causal map as ``o = A v``, ``A`` lower triangular, its diagonal is ``A_tt = beta_t
(q_t . k_t)``: the weight of ``v_t`` in ``o_t``, token ``t``'s own write read back by its own
query, which depends on token ``t`` alone and is the same in both directions. With
``A_rev`` the causal map of the reversed sequence, reversed back (upper triangular), the
non-causal map is ``A + A_rev - diag(A)``; computed as two chunkwise passes minus
``beta_t (q_t . k_t) v_t``, ``O(N)`` as the causal form.

**Key padding** (a bool ``attn_mask`` ``(B, H, 1, N)``, ``False`` = padded) is exact: a
padded position writes nothing, ``beta_j = 0`` (then ``S_j = S_{j-1}``, an identity step),
and its key and value are zeroed first so that their content reaches nothing, not even a
gradient. The real rows therefore equal the mechanism run on the sequence with the padded
positions removed, wherever they are (causal and non-causal). A padded query still reads
the memory: its row is defined but meaningless, as for every padding mechanism.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.contract import work_dtype
from attnlab.mechanisms._engines.decode_state import check_decode_state
from attnlab.mechanisms.base import Mechanism, by_heads, check_head_sizes, key_padding_keep
from attnlab.registry import REQUIRED, HParam, Limit, Paper, register_mechanism
from attnlab.verify import param_f64

__all__ = ["DeltaNet", "chunk_delta_rule", "delta_matrix", "delta_reference",
           "recurrent_delta_rule"]

SCHLAG_2021 = Paper(
    "Linear Transformers Are Secretly Fast Weight Programmers",
    "Imanol Schlag, Kazuki Irie, Jürgen Schmidhuber",
    2021,
    "https://arxiv.org/abs/2102.11174",
)
YANG_2024 = Paper(
    "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
    "Songlin Yang, Bailin Wang, Yu Zhang, Yikang Shen, Yoon Kim",
    2024,
    "https://arxiv.org/abs/2406.06484",
)
_EPS = 1e-12  # floor of |q|, |k| in the L2 normalisation (a zero vector stays zero)


# ---------------------------------------------------------------- the two forms
class _UnitLowerInverse(torch.autograd.Function):
    """``T = (I + L)^-1`` for strictly lower-triangular ``L`` ``(..., C, C)``: one triangular
    solve against ``I`` (on CPU 4x faster than against ``[Kb, Vb]``, whose product with
    ``T`` is then a matmul), and the matmul backward ``dL = -tril(T^T dT T^T, -1)`` (from
    ``dT = -T dL T``): autograd's own solve_triangular backward took 14x the solve."""

    @staticmethod
    def forward(ctx, L):
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
        T = torch.linalg.solve_triangular(L, eye, upper=False, unitriangular=True)
        ctx.save_for_backward(T)
        return T

    @staticmethod
    def backward(ctx, grad):
        (T,) = ctx.saved_tensors
        Tt = T.transpose(-1, -2)
        return -torch.tril(Tt @ grad @ Tt, -1)


def chunk_delta_rule(q, k, v, beta, chunk_size: int, S=None):
    """``(o, S)``: the delta rule over ``N`` positions, chunk by chunk (WY/UT transform).

    ``q, k`` ``(B, H, N, D)`` already normalised (``q`` scaled), ``v`` ``(B, H, N, Dv)``,
    ``beta`` ``(B, H, N)``; ``S`` ``(B, H, D, Dv)`` the state before them (``None``: zeros),
    the returned ``S`` the state after them. ``o_t = S_t^T q_t``.
    """
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    C = min(chunk_size, N)
    n = -(-N // C)
    pad = n * C - N
    if pad:  # zero keys and values at the end: they write nothing, their rows are dropped
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, pad))
    Q, K, V = (x.reshape(B, H, n, C, -1) for x in (q, k, v))
    b = beta.reshape(B, H, n, C, 1)
    Kb = K * b
    T = _UnitLowerInverse.apply(torch.tril(Kb @ K.transpose(-1, -2), -1))
    W, U = T @ Kb, T @ (V * b)
    if S is None:
        S = q.new_zeros(B, H, D, Dv)
    starts, us = [], []
    # The only sequential part: one (C, D) x (D, Dv) product per chunk. unbind, not
    # indexing: each index's backward would write a zero tensor of the whole size.
    for W_i, U_i, K_i in zip(W.unbind(2), U.unbind(2), K.unbind(2), strict=True):
        starts.append(S)
        u = U_i - W_i @ S
        us.append(u)
        S = S + K_i.transpose(-1, -2) @ u
    u, starts = torch.stack(us, dim=2), torch.stack(starts, dim=2)
    o = Q @ starts + torch.tril(Q @ K.transpose(-1, -2)) @ u
    return o.reshape(B, H, n * C, Dv)[:, :, :N], S


def recurrent_delta_rule(q, k, v, beta, S=None):
    """``(o, S)`` as :func:`chunk_delta_rule`, one position at a time: ``u_t = beta_t (v_t -
    S^T k_t)``, ``S <- S + k_t u_t^T``, ``o_t = S^T q_t`` (for decoding a few tokens)."""
    B, H, N, D = q.shape
    if S is None:
        S = q.new_zeros(B, H, D, v.shape[-1])
    outs = []
    for t in range(N):
        k_t = k[:, :, t].unsqueeze(-1)                                  # (B, H, D, 1)
        u = beta[:, :, t, None, None] * (v[:, :, t].unsqueeze(-2) - k_t.transpose(-1, -2) @ S)
        S = S + k_t @ u
        outs.append(q[:, :, t].unsqueeze(-2) @ S)
    return torch.cat(outs, dim=-2), S


def _bidirectional(q, k, v, beta, chunk_size: int):
    """``A v + A_rev v - diag(A) v``: both directions' scans, the diagonal once."""
    fwd, _ = chunk_delta_rule(q, k, v, beta, chunk_size)
    rev, _ = chunk_delta_rule(q.flip(2), k.flip(2), v.flip(2), beta.flip(2), chunk_size)
    diag = beta * (q * k).sum(dim=-1)                                  # A_tt = beta_t q_t.k_t
    return fwd + rev.flip(2) - diag.unsqueeze(-1) * v


# ---------------------------------------------------------------- float64 reference
def delta_matrix(q, k, beta):
    """The causal map ``A`` ``(B, H, N, N)``, ``o = A v``, in closed form: ``A = tril(Q K^T)
    (I + tril(diag(beta) K K^T, -1))^-1 diag(beta)`` (``q, k`` normalised, ``q`` scaled)."""
    n = q.shape[-2]
    eye = torch.eye(n, dtype=q.dtype, device=q.device)
    M = eye + torch.tril(beta.unsqueeze(-1) * (k @ k.transpose(-1, -2)), -1)
    # A triangular solve, not linalg.inv: inv's LU path failed intermittently in the test
    # suite here ("Pivots given to lu_solve must all be greater or equal to 1") on these
    # well-conditioned unit-triangular M (not reproduced in isolation; torch 2.13 CPU).
    T = torch.linalg.solve_triangular(M, eye.expand_as(M), upper=False)
    return torch.tril(q @ k.transpose(-1, -2)) @ T * beta.unsqueeze(-2)


def delta_reference(q, k, v, *, mech, scale, is_causal):
    """``A v`` in float64 with the dense ``A`` of :func:`delta_matrix` (non-causal: ``A +
    A_rev - diag(A)``, ``A_rev`` that of the reversed sequence, reversed back)."""
    q, k, v = q.double(), k.double(), v.double()
    w, b = param_f64(mech.w_beta), param_f64(mech.b_beta)
    beta = torch.sigmoid(torch.einsum("bhnd,hd->bhn", k, w) + b[:, None])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qn = q / q.norm(dim=-1, keepdim=True).clamp_min(_EPS) * scale
    kn = k / k.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    A = delta_matrix(qn, kn, beta)
    if not is_causal:
        A_rev = delta_matrix(qn.flip(-2), kn.flip(-2), beta.flip(-1)).flip(-2, -1)
        A = A + A_rev - torch.diag_embed(torch.diagonal(A, dim1=-2, dim2=-1))
    return A @ v


# ---------------------------------------------------------------- the mechanism
@register_mechanism(
    "deltanet",
    family="delta",
    paper=SCHLAG_2021,
    time="O(N C D + N D Dv)",
    memory="O(N (C + D + Dv) + (N / C) D Dv)",
    equation="S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,  o_t = S_t q_t;  "
             "k_t <- k_t / |k_t|, q_t <- scale q_t / |q_t|, beta_t = sigmoid(w_h . k_t + b_h) "
             "(un-normalised k_t), scale = D^-1/2;  chunkwise (Yang et al. 2024): "
             "T = (I + tril(diag(beta) K K^T, -1))^-1, W = T diag(beta) K, "
             "U = T diag(beta) V;  non-causal: A + A_rev - diag(A) with o = A v",
    aliases=("delta_rule",),
    exact=False,
    causal=True,
    arbitrary_mask=False,
    key_padding=True,
    cross=False,
    returns_weights=False,
    learnable=True,
    decode_state=True,
    hparams=[
        HParam("head_dim", int, REQUIRED, "size D of each query/key head (w_h of beta)",
               low=1),
        HParam("num_heads", int, REQUIRED, "heads H (each its own w_h, b_h)", low=1),
        HParam("chunk_size", int, 64, "positions C per chunk of the WY/UT form", low=1),
    ],
    tiny_hparams={"chunk_size": 4},
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, dense A = tril(QK^T) "
                "(I + tril(diag(beta) KK^T, -1))^-1 diag(beta)", reference=delta_reference),
)
class DeltaNet(Mechanism):
    """DeltaNet (Schlag et al. 2021; chunkwise as Yang et al. 2024): the delta-rule memory.

    ``S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T``, ``o_t = S_t q_t``, keys and
    queries L2-normalised, ``beta_t = sigmoid(w_h . k_t + b_h)`` learned per head (the
    module docstring says why from ``k``). ``w_beta`` ``(H, D)``, ``b_beta`` ``(H,)``.
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        H, D = self.hp["num_heads"], self.hp["head_dim"]
        bound = 1.0 / math.sqrt(D)
        self.w_beta = nn.Parameter(torch.empty(H, D).uniform_(-bound, bound))
        self.b_beta = nn.Parameter(torch.zeros(H))

    def _prepare(self, q, k, v, scale, heads, keep=None):
        """Work-dtype ``(scale q / |q|, k / |k|, v, beta)`` for the heads ``heads``;
        ``keep`` ``(B, H, N)`` bool (or None) marks the real positions."""
        work = work_dtype(q.dtype)
        q, k, v = q.to(work), k.to(work), v.to(work)
        if keep is not None:  # padded content must reach nothing, not even as inf * 0
            k, v = (t.masked_fill(~keep.unsqueeze(-1), 0.0) for t in (k, v))
        w, b = self.w_beta[heads].to(work), self.b_beta[heads].to(work)
        beta = torch.sigmoid(torch.einsum("bhnd,hd->bhn", k, w) + b[:, None])
        if keep is not None:  # a padded position writes nothing: an identity step
            beta = beta.masked_fill(~keep, 0.0)
        qn = F.normalize(q, dim=-1, eps=_EPS) * scale
        return qn, F.normalize(k, dim=-1, eps=_EPS), v, beta

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        if dropout_p > 0:
            raise ValueError(f"deltanet: dropout_p={dropout_p} is not supported: the delta rule "
                             f"never forms the attention weights it would drop; pass 0")
        check_head_sizes(self, q, "w_beta")
        C = self.hp["chunk_size"]

        def heads(q, k, v, mask, s):
            keep = key_padding_keep(mask, *k.shape[:3])
            qn, kn, vw, beta = self._prepare(q, k, v, scale, s, keep)
            if is_causal:
                out = chunk_delta_rule(qn, kn, vw, beta, C)[0]
            else:
                out = _bidirectional(qn, kn, vw, beta, C)
            return out.to(v.dtype)

        per_head = q.shape[2] * (min(C, q.shape[2]) + 2 * q.shape[-1] + 2 * v.shape[-1])
        return by_heads(heads, q, k, v, attn_mask, per_head), None

    # ------------------------------------------------------- decoding (decode_state)
    def _decode(self, q, k, v, state, scale):
        """The state ``{"S": (B, H, D, Dv), "t": int}`` continued over ``n`` positions:
        recurrently for ``n < chunk_size``, else chunkwise (a long prefill)."""
        check_head_sizes(self, q, "w_beta")
        qn, kn, vw, beta = self._prepare(q, k, v, scale, slice(None))
        B, H, _, D = qn.shape
        check_decode_state("deltanet", state, {"S": ((B, H, D, vw.shape[-1]), qn.dtype)},
                           qn.device, "(B, H, D, Dv)")
        S = None if state is None else state["S"]
        n = q.shape[2]
        if n < self.hp["chunk_size"]:
            out, S = recurrent_delta_rule(qn, kn, vw, beta, S)
        else:
            out, S = chunk_delta_rule(qn, kn, vw, beta, self.hp["chunk_size"], S)
        t = 0 if state is None else state["t"]
        return out.to(q.dtype), {"S": S, "t": t + n}
