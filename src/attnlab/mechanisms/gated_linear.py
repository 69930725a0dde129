"""Gated linear attention: RetNet, GLA and Mamba-2 (SSD), one decayed recurrence.

Linear attention with a forgetting state: ``S_t = G_t * S_{t-1} + k_t^T v_t``, ``o_t = q_t
S_t``, so ``o_t = sum_{s<=t} (q_t . (prod_{r=s+1..t} G_r) k_s) v_s``. The three differ in
the decay ``G_t``:

* **RetNet** (Sun et al. 2023): ``o_n = sum_{m<=n} gamma^(n-m) (q_n . k_m) v_m``, a fixed
  ``gamma_h = 1 - 2^(-5-h)`` per head ``h = 0..H-1`` (the heads of the call: the formula
  needs no ``num_heads``), scale ``D^-1/2`` on ``q`` (as fla). The paper's xPos rotation
  (``Theta``) is a position encoding (``positions="rope"`` in a layer), its GroupNorm and
  swish gate are layer-level: out of scope here.
* **GLA** (Yang et al. 2024): ``S_t = diag(alpha_t) S_{t-1} + k_t^T v_t``, ``alpha_t in (0,
  1)^Dk`` data-dependent, ``alpha_t = sigmoid(x_t W_1 W_2 + b)^(1/tau)`` (low rank 16, ``tau
  = 16``) in the paper. *Adaptation*: the contract hands a mechanism ``q, k, v``, not
  ``x_t``, so the gate is predicted from the token's key by the head's own low-rank
  parameters, ``log alpha_t = logsigmoid(W_2 W_1 k_t + b) / tau`` (a linear function of
  ``x_t`` in a layer: the same family of gates up to the projection). Scale ``D^-1/2`` (as
  fla); the output gate and norm are layer-level.
* **Mamba-2** (Dao & Gu 2024, state-space duality): ``y_t = sum_{s<=t} (prod_{r=s+1..t}
  a_r) (C_t . B_s) x_s dt_s`` with the scalar ``a_t = exp(-dt_t A_h)``, ``dt_t =
  softplus(w_h . k_t + b_h)``, ``A_h = exp(A_log_h)``, learned per head. *Mapping*: ``C =
  q``, ``B = k``, ``x = v``; ``dt_t`` is predicted from the key (the paper projects it from
  the block's input); the input is discretised as in Mamba-2 (``B_s x_s dt_s``, so ``v``
  is scaled by ``dt``). Default scale 1 (Mamba-2 scales nothing); its convolution, ``D x``
  skip, gate ``z`` and norm are layer-level.

**Forms** (:mod:`~attnlab.mechanisms._engines.gated_chunk`): chunkwise-parallel in
PyTorch, ``O(N C D)`` with chunk ``C`` (``chunk_size``), cumulative log-decays counted from
each chunk's start (GLA: secondary chunks of ``sub_chunk_size``), never an ``N x N``
tensor; recurrent for decoding a few tokens (a long prefill is chunkwise and returns the
final state). The state ``S`` ``(B, H, Dk, Dv)`` is in float32 for half-precision inputs.

**Non-causal form** (the papers are causal): ``A = L + U - diag``, the causal map ``L`` plus
that of the reversed sequence reversed back (``U``), the diagonal ``q_t . k_t`` (decay 1)
once, as Hydra (Hwang et al. 2024) does for SSMs; RetNet's bidirectional ``gamma^|n-m|``
is exactly this. Two chunkwise passes.

**Key padding** (a bool ``attn_mask`` ``(B, H, 1, N)``, ``False`` = padded) is exact: a padded
position's key and value are zeroed (it writes nothing, not even a gradient) and its decay
is 1 (an identity step), so the real rows equal the mechanism on the sequence with the
padded positions removed (RetNet's distances ``n - m`` then count real tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.contract import work_dtype
from attnlab.mechanisms._engines.gated_chunk import (
    bidirectional_gated,
    chunk_gated,
    decode_gated,
)
from attnlab.mechanisms.base import Mechanism, by_heads, check_head_sizes, key_padding_keep
from attnlab.registry import REQUIRED, HParam, Limit, Paper, register_mechanism
from attnlab.verify import param_f64

__all__ = ["GLA", "Mamba2", "RetNet", "decay_matrix_f64", "gla_reference",
           "mamba2_reference", "retnet_gammas", "retnet_reference"]

SUN_2023 = Paper("Retentive Network: A Successor to Transformer for Large Language Models",
                 "Yutao Sun, Li Dong, Shaohan Huang, Shuming Ma, Yuqing Xia, Jilong Xue, "
                 "Jianyong Wang, Furu Wei", 2023, "https://arxiv.org/abs/2307.08621")
YANG_2024 = Paper("Gated Linear Attention Transformers with Hardware-Efficient Training",
                  "Songlin Yang, Bailin Wang, Yikang Shen, Rameswar Panda, Yoon Kim", 2024,
                  "https://arxiv.org/abs/2312.06635")
DAO_GU_2024 = Paper("Transformers are SSMs: Generalized Models and Efficient Algorithms "
                    "Through Structured State Space Duality", "Tri Dao, Albert Gu", 2024,
                    "https://arxiv.org/abs/2405.21060")
_FLAGS = dict(family="gated_linear", exact=False, causal=True, arbitrary_mask=False,
              key_padding=True, cross=False, returns_weights=False, decode_state=True)
_CHUNK = HParam("chunk_size", int, 64, "positions C per chunk of the chunkwise form", low=1)
_TIME = "O(N C (D + Dv) + N D Dv)"


# ---------------------------------------------------------------- float64 references
def decay_matrix_f64(q, k, log_a):
    """The causal map ``A`` ``(B, H, N, N)``, ``o = A v``: ``A_ij = sum_d q_id k_jd
    prod_{r=j+1..i} a_rd`` for ``j <= i``, from the log-decays ``log_a`` ``(B, H, N, 1|Dk)``
    (float64, one row at a time)."""
    cum = log_a.cumsum(2)
    j = torch.arange(q.shape[2])
    rows = []
    for i in range(q.shape[2]):
        expo = torch.where((j <= i)[:, None], cum[:, :, i:i + 1] - cum, -math.inf)
        rows.append((q[:, :, i:i + 1] * k * expo.exp()).sum(-1))
    return torch.stack(rows, dim=2)


def _dense(q, k, v, log_a, is_causal):
    """``A v``, or ``(A + A_rev - diag(A)) v`` non-causal (``A_rev`` the map of the
    reversed sequence, reversed back)."""
    A = decay_matrix_f64(q, k, log_a)
    if not is_causal:
        A_rev = decay_matrix_f64(q.flip(2), k.flip(2), log_a.flip(2)).flip(-2, -1)
        A = A + A_rev - torch.diag_embed(torch.diagonal(A, dim1=-2, dim2=-1))
    return A @ v


def retnet_reference(q, k, v, *, mech, scale, is_causal):
    """``((Q K^T * scale) .* D) V``, ``D_nm = gamma_h^(n-m)`` (``n >= m``; non-causal
    ``gamma_h^|n-m|``), powers of the paper's ``gamma_h`` written out in float64."""
    q, k, v = q.double(), k.double(), v.double()
    H, N = q.shape[1], q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    gammas = retnet_gammas(H, mech.hp["gamma"])
    dist = torch.arange(N)[:, None] - torch.arange(N)[None, :]
    D = gammas[:, None, None] ** dist.abs()
    if is_causal:
        D = D * (dist >= 0)
    return (q @ k.transpose(-1, -2) * scale * D) @ v


def gla_reference(q, k, v, *, mech, scale, is_causal):
    """GLA's ``o_t = q_t S_t`` densely: ``log alpha_t = logsigmoid(W2 W1 k_t + b) / tau``."""
    q, k, v = q.double(), k.double(), v.double()
    W1, W2, b = (param_f64(p) for p in (mech.W1, mech.W2, mech.b))
    z = torch.einsum("bhnd,hrd,her->bhne", k, W1, W2) + b[:, None]
    log_alpha = F.logsigmoid(z) / mech.hp["temperature"]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _dense(q * scale, k, v, log_alpha, is_causal)


def mamba2_reference(q, k, v, *, mech, scale, is_causal):
    """SSD's ``y = M x``, ``M_ts = (C_t . B_s) dt_s prod_{r=s+1..t} exp(-dt_r A)``, densely."""
    q, k, v = q.double(), k.double(), v.double()
    w, b, A_log = (param_f64(p) for p in (mech.w_dt, mech.b_dt, mech.A_log))
    dt = F.softplus(torch.einsum("bhnd,hd->bhn", k, w) + b[:, None])
    log_a = -(dt * A_log.exp()[:, None]).unsqueeze(-1)
    scale = 1.0 if scale is None else scale
    return _dense(q * scale, k, v * dt.unsqueeze(-1), log_a, is_causal)


def retnet_gammas(H: int, gamma: float | None = None) -> torch.Tensor:
    """``(H,)`` float64: the paper's ``gamma_h = 1 - 2^(-5-h)``, or ``gamma`` for every head."""
    if gamma is not None:
        return torch.full((H,), float(gamma), dtype=torch.float64)
    return 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))


# ---------------------------------------------------------------- the family's base
class _GatedLinear(Mechanism):
    """The forms every mechanism here shares; a subclass gives :meth:`_gate`, the
    log-decays ``g`` ``(B, H, N, 1|Dk)`` and the values the state writes."""

    def _gate(self, k, v, heads):
        """``(g, v)`` for keys/values in the work dtype; ``heads`` the absolute head
        indices (a ``LongTensor``) of these heads."""
        raise NotImplementedError

    def _prepare(self, q, k, v, scale, heads, keep=None):
        """Work-dtype ``(scale q, k, v, g)``; ``keep`` ``(B, H, N)`` bool (or None) marks the
        real positions: a padded one is zeroed and decays by 1, an identity step."""
        work = work_dtype(q.dtype)
        q, k, v = q.to(work), k.to(work), v.to(work)
        if keep is not None:  # padded content must reach nothing, not even as inf * 0
            k, v = (t.masked_fill(~keep.unsqueeze(-1), 0.0) for t in (k, v))
        g, v = self._gate(k, v, heads)
        if keep is not None:
            g = g.masked_fill(~keep.unsqueeze(-1), 0.0)
        return q * scale, k, v, g

    def _sub_chunk(self) -> int:
        return self.hp.get("sub_chunk_size", self.hp["chunk_size"])

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        if dropout_p > 0:
            raise ValueError(f"{self.spec.name}: dropout_p={dropout_p} is not supported: the "
                             f"recurrence never forms the attention weights it would drop; "
                             f"pass 0")
        check_head_sizes(self, q)
        C, c = self.hp["chunk_size"], self._sub_chunk()
        index = torch.arange(q.shape[1], device=q.device)

        def heads(q, k, v, mask, s):
            keep = key_padding_keep(mask, *k.shape[:3])
            args = self._prepare(q, k, v, scale, index[s], keep)
            if is_causal:
                return self._cast(chunk_gated(*args, C, sub_chunk=c)[0], v.dtype)
            return self._cast(bidirectional_gated(*args, C, c), v.dtype)

        N, D, Dv = q.shape[2], q.shape[-1], v.shape[-1]
        per_dim = "sub_chunk_size" in self.hp
        per_head = N * (min(C, N) + 2 * (D + Dv) + (3 * c + C // c) * D * per_dim) \
            + (N // C + 1) * D * Dv
        return by_heads(heads, q, k, v, attn_mask, per_head), None

    def _decode(self, q, k, v, state, scale):
        """The state ``{"S": (B, H, Dk, Dv), "t": int}`` continued over ``n`` positions."""
        check_head_sizes(self, q)
        index = torch.arange(q.shape[1], device=q.device)
        args = self._prepare(q, k, v, scale, index)
        out, new = decode_gated(self.spec.name, *args, state, self.hp["chunk_size"],
                                self._sub_chunk())
        return self._cast(out, q.dtype), new

    def _cast(self, out, dtype):
        """``out`` in ``dtype``; a clear error rather than inf where the (unnormalised: no
        softmax bounds it) float32 result exceeds float16's range."""
        if dtype == torch.float16:
            top, limit = float(out.detach().abs().max()), torch.finfo(torch.float16).max
            if top > limit:
                raise ValueError(f"{self.spec.name}: the result overflows torch.float16 (max "
                                 f"|value| {top:.3g} > {limit:.0f}: nothing normalises a "
                                 f"decayed sum of q . k v); use torch.bfloat16 or "
                                 f"torch.float32, or a smaller scale")
        return out.to(dtype)


def _uniform(*shape, fan_in: int) -> nn.Parameter:
    """``nn.Linear``'s initialisation, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


# ---------------------------------------------------------------- RetNet
@register_mechanism(
    "retnet", paper=SUN_2023, time=_TIME, memory="O(N (C + D + Dv) + (N / C) D Dv)",
    equation="o_n = sum_{m<=n} gamma^(n-m) (Q_n . K_m) V_m, i.e. (Q K^T .* D) V with "
             "D_nm = gamma^(n-m) (n >= m);  S_n = gamma S_{n-1} + K_n^T V_n, o_n = Q_n S_n;  "
             "gamma_h = 1 - 2^(-5-h) per head, Q scaled by D^-1/2;  non-causal: "
             "D_nm = gamma^|n-m| (L + U - diag)",
    aliases=("retention",), learnable=False, **_FLAGS,
    hparams=[_CHUNK,
             HParam("gamma", float, None, "one decay for every head, in (0, 1] (None: the "
                    "paper's gamma_h = 1 - 2^(-5-h)); 1 is causal linear attention q . k",
                    low=0.0, low_exclusive=True, high=1.0, nullable=True)],
    tiny_hparams={"chunk_size": 4},
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, (Q K^T .* D) V with "
                "D_nm = gamma_h^(n-m), dense in float64", reference=retnet_reference),
)
class RetNet(_GatedLinear):
    """Retention (Sun et al. 2023): linear attention whose state decays by a fixed
    ``gamma_h = 1 - 2^(-5-h)`` per head, ``o_n = sum_{m<=n} gamma^(n-m) (q_n . k_m) v_m``."""

    def _gate(self, k, v, heads):
        log_gamma = torch.log(retnet_gammas(int(heads.max()) + 1, self.hp["gamma"]))
        g = log_gamma.to(k.device, k.dtype)[heads]
        return g[None, :, None, None].expand(k.shape[0], -1, k.shape[2], 1), v


# ---------------------------------------------------------------- GLA
@register_mechanism(
    "gla", paper=YANG_2024, time=_TIME, memory="O(N (C + c D + Dv) + (N / C) D Dv)",
    equation="S_t = G_t .* S_{t-1} + k_t^T v_t, G_t = alpha_t^T 1, o_t = q_t S_t;  "
             "alpha_t = sigmoid(W_2 W_1 k_t + b)^(1/tau) (from the key: the contract's "
             "adaptation of x_t), log-space: log alpha_t = logsigmoid(.) / tau, tau = 16, "
             "rank 16;  q scaled by D^-1/2;  non-causal: L + U - diag",
    learnable=True, **_FLAGS,
    hparams=[HParam("head_dim", int, REQUIRED, "size D of each key head (the gate's input "
                    "and output)", low=1),
             HParam("num_heads", int, REQUIRED, "heads H (each its own gate)", low=1),
             _CHUNK,
             HParam("sub_chunk_size", int, 16, "positions c per secondary chunk (diagonal "
                    "sub-blocks elementwise): divides chunk_size, or >= it (c = C)", low=1),
             HParam("gate_rank", int, 16, "rank r of the gate's W_2 W_1", low=1),
             HParam("temperature", float, 16.0, "tau: alpha = sigmoid(.)^(1/tau)", low=0.0,
                    low_exclusive=True)],
    tiny_hparams={"chunk_size": 4, "sub_chunk_size": 2, "gate_rank": 2},
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, A_ij = sum_d q_id k_jd "
                "prod_{r=j+1..i} alpha_rd, dense in float64", reference=gla_reference),
)
class GLA(_GatedLinear):
    """Gated linear attention (Yang et al. 2024): a data-dependent decay ``alpha_t in (0,
    1)^Dk`` per key dimension, ``S_t = diag(alpha_t) S_{t-1} + k_t^T v_t``. Parameters per
    head: ``W1`` ``(H, r, D)``, ``W2`` ``(H, D, r)``, ``b`` ``(H, D)`` (``nn.Linear``'s init)."""

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        H, D, r = self.hp["num_heads"], self.hp["head_dim"], self.hp["gate_rank"]
        C, c = self.hp["chunk_size"], self.hp["sub_chunk_size"]
        if c < C and C % c:
            raise ValueError(f"gla: hyperparameter 'sub_chunk_size' must divide 'chunk_size'"
                             f"={C} (or be >= it: one sub-chunk per chunk); got {c}")
        self.W1 = _uniform(H, r, D, fan_in=D)
        self.W2 = _uniform(H, D, r, fan_in=r)
        self.b = _uniform(H, D, fan_in=r)

    def log_alpha(self, k, heads=None):
        """``log alpha_t`` ``(B, H, N, D)`` from keys ``k`` of heads ``heads`` (all if None)."""
        heads = torch.arange(k.shape[1], device=k.device) if heads is None else heads
        W1, W2, b = (p[heads].to(k.dtype) for p in (self.W1, self.W2, self.b))
        z = torch.einsum("bhnr,her->bhne", torch.einsum("bhnd,hrd->bhnr", k, W1), W2)
        return F.logsigmoid(z + b[:, None]) / self.hp["temperature"]

    def _gate(self, k, v, heads):
        return self.log_alpha(k, heads), v


# ---------------------------------------------------------------- Mamba-2
@register_mechanism(
    "mamba2", paper=DAO_GU_2024, time=_TIME, memory="O(N (C + D + Dv) + (N / C) D Dv)",
    equation="h_t = a_t h_{t-1} + B_t x_t dt_t, y_t = C_t^T h_t, i.e. y_t = sum_{s<=t} "
             "(prod_{r=s+1..t} a_r) (C_t . B_s) dt_s x_s;  a_t = exp(-dt_t A_h), "
             "dt_t = softplus(w_h . B_t + b_h), A_h = exp(A_log_h);  C = q, B = k, x = v, "
             "scale 1 by default;  non-causal: L + U - diag",
    aliases=("ssd",), learnable=True, **_FLAGS,
    hparams=[HParam("head_dim", int, REQUIRED, "size D of each key head (w_h of dt)", low=1),
             HParam("num_heads", int, REQUIRED, "heads H (each its own A_h, w_h, b_h)", low=1),
             _CHUNK],
    tiny_hparams={"chunk_size": 4},
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, SSD's M_ts = (C_t . B_s) "
                "dt_s prod_{r=s+1..t} a_r, dense in float64", reference=mamba2_reference),
)
class Mamba2(_GatedLinear):
    """Mamba-2's SSD layer core (Dao & Gu 2024): a scalar decay ``a_t = exp(-dt_t A_h)`` per
    head and step. ``A_log`` ``(H,)`` (``A ~ U[1, 16]``), ``w_dt`` ``(H, D)``, ``b_dt`` ``(H,)``
    (``softplus(b_dt)`` log-uniform in ``[1e-3, 1e-1]``), Mamba-2's initialisation."""

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        H, D = self.hp["num_heads"], self.hp["head_dim"]
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1.0, 16.0).log())
        dt = torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        self.b_dt = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.w_dt = _uniform(H, D, fan_in=D)

    def default_scale(self, d: int) -> float:
        return 1.0  # Mamba-2 multiplies C_t . B_s by nothing

    def dt(self, k, heads=None):
        """``dt_t = softplus(w_h . k_t + b_h)`` ``(B, H, N)`` for keys ``k`` of ``heads``."""
        heads = torch.arange(k.shape[1], device=k.device) if heads is None else heads
        w, b = self.w_dt[heads].to(k.dtype), self.b_dt[heads].to(k.dtype)
        return F.softplus(torch.einsum("bhnd,hd->bhn", k, w) + b[:, None])

    def _gate(self, k, v, heads):
        dt = self.dt(k, heads)
        log_a = -dt * self.A_log[heads].to(k.dtype).exp()[:, None]
        return log_a.unsqueeze(-1), v * dt.unsqueeze(-1)
