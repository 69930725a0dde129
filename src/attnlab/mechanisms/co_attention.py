r"""Co-attention over two sequences: Lu et al. 2016 (arXiv 1606.00061), Sec. 3.3.

Two sequences of different lengths, a question ``Q = [q_1 .. q_T]`` and an image (here any
second sequence, a passage) ``V = [v_1 .. v_N]``, each column a ``d``-vector, are attended
*jointly*: each side's attention depends on the other side, and each returns one summary.
Symbols as in the paper; ``k`` is the hidden size (``hidden_dim``).

* **Parallel co-attention** (eq. 3-5): the affinity of every (word, region) pair,

  .. math::

      C = \tanh(Q^\top W_b V) \in \mathbb{R}^{T \times N}, \quad
      H^v = \tanh(W_v V + (W_q Q) C), \quad H^q = \tanh(W_q Q + (W_v V) C^\top),

      a^v = \mathrm{softmax}(w_{hv}^\top H^v), \quad a^q = \mathrm{softmax}(w_{hq}^\top H^q),
      \quad \hat v = \textstyle\sum_n a^v_n v_n, \quad \hat q = \sum_t a^q_t q_t

  with ``W_b`` (``d x d``), ``W_v, W_q`` (``k x d``), ``w_hv, w_hq`` (``k``).
* **Alternating co-attention** (eq. 6): one attention operation guided by a vector ``g``,

  .. math::

      \hat x = \mathcal{A}(X; g):\quad H = \tanh(W_x X + (W_g g) 1^\top), \quad
      a^x = \mathrm{softmax}(w_{hx}^\top H), \quad \hat x = \textstyle\sum_i a^x_i x_i,

  applied three times: ``s = A(Q; 0)`` summarises the question, ``v^ = A(V; s)`` attends
  the image guided by it, ``q^ = A(Q; v^)`` attends the question guided by the attended
  image. The paper writes the one operation ``A``; each step here has its own
  parameters (``W_x1, w_hx1``; ``W_x2, W_g2, w_hx2``; ``W_x3, W_g3, w_hx3``), as the steps
  read different sequences under different guidance (with ``g = 0`` step 1 has no ``W_g``).

No bias terms, as the equations. The pair contract (:data:`attnlab.registry.INPUTS`,
``"pair"``): ``forward(a, b, *, a_mask=None, b_mask=None, need_weights=False)`` with
``a = Q^T`` ``(B, Na, D)`` and ``b = V^T`` ``(B, Nb, D)`` (rows are the paper's columns),
returns ``(a_hat, b_hat)`` = ``(q^, v^)``, each ``(B, D)``; with ``need_weights``,
``((a_hat, b_hat), (a_weights, b_weights))`` = ``((q^, v^), (a^q, a^v))``, ``(B, Na)`` and
``(B, Nb)``. Masks are bool ``(B, Na)`` / ``(B, Nb)``, ``True`` = a real position that may
be attended (attnlab's convention). A padded position gets weight exactly 0 and never
enters the other side: its features are zeroed first, so (no biases) its rows of
``W_q Q`` and ``W_v V`` and its row or column of ``C = tanh(0) = 0`` vanish exactly, and
the result equals that of the real positions alone. A sequence with no real position
summarises to zeros (the contract's fully masked rows).

Cost. Parallel co-attention forms the affinity matrix ``C``: ``O(Na Nb)`` memory, which is
the method (every word scores against every region), not an implementation detail.
Alternating co-attention never pairs positions: ``O((Na + Nb) k)``.

Defining property (``tests/test_co_attention.py``): with the other side switched off
(``W_b = 0`` or ``W_g = 0``) each summary is the self-attentive pooling of its own sequence,
``softmax(w^T tanh(W X)) X`` (Lin et al. 2017 with one hop); and co-attention of a sequence
with itself under symmetric parameters gives two equal summaries, each the self-attention
pooling written for one sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from attnlab.contract import format_shape, masked_softmax, work_dtype
from attnlab.mechanisms.base import Mechanism
from attnlab.registry import REQUIRED, HParam, Limit, Paper, create_for, register_mechanism
from attnlab.util.checks import check_bool
from attnlab.verify import dense_softmax_f64, param_f64

__all__ = ["LU_2016", "AlternatingCoAttention", "ParallelCoAttention",
           "alternating_reference", "parallel_reference"]

LU_2016 = Paper(
    "Hierarchical Question-Image Co-Attention for Visual Question Answering",
    "Jiasen Lu, Jianwei Yang, Dhruv Batra, Devi Parikh",
    2016,
    "https://arxiv.org/abs/1606.00061",
)
_FLAGS = dict(family="co_attention", inputs="pair", paper=LU_2016, exact=True, causal=False,
              arbitrary_mask=False, key_padding=True, cross=True, returns_weights=True,
              half_precision=True, learnable=True)
_HPARAMS = [
    HParam("head_dim", int, REQUIRED, "feature size d of both sequences", low=1),
    HParam("hidden_dim", int, None, "hidden size k of H (None = head_dim)", low=1,
           nullable=True),
]


# ---------------------------------------------------------------- float64 references
# The equations written plainly in float64 for the correctness gate, with an explicit
# (Na, Nb) pair mask (the module zeroes padded features instead): row-vector form,
# a = Q^T, b = V^T.
def _real(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, N)`` bool, True at the real positions of ``x`` ``(B, N, D)``."""
    return torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask.cpu()


def _pool_f64(scores, x, real):
    """``sum_i softmax(scores)_i x_i`` over the real positions: ``(B, D)``."""
    return dense_softmax_f64(scores.unsqueeze(-2), x, real.unsqueeze(-2)).squeeze(-2)


def parallel_reference(a, b, a_mask=None, b_mask=None, *, mech):
    """``(q^, v^)`` of eq. 3-5 for ``Q = a^T``, ``V = b^T``, in float64."""
    W_b, W_q, W_v, w_hq, w_hv = (param_f64(p) for p in
                                 (mech.W_b, mech.W_q, mech.W_v, mech.w_hq, mech.w_hv))
    Q, V = a.double().cpu(), b.double().cpu()
    ra, rb = _real(a, a_mask), _real(b, b_mask)
    C = torch.tanh(Q @ W_b @ V.transpose(1, 2))                       # C[t, n] = q_t W_b v_n
    C = torch.where(ra.unsqueeze(2) & rb.unsqueeze(1), C, 0.0)        # real (t, n) pairs only
    H_v = torch.tanh(V @ W_v.T + C.transpose(1, 2) @ (Q @ W_q.T))     # (B, N, k): H^v columns
    H_q = torch.tanh(Q @ W_q.T + C @ (V @ W_v.T))                     # (B, T, k): H^q columns
    return _pool_f64(H_q @ w_hq, Q, ra), _pool_f64(H_v @ w_hv, V, rb)


def _guided_f64(X, g, W_x, W_g, w_hx, real):
    """``A(X; g)`` of eq. 6 in float64 (``g = None``: the zero guidance of step 1)."""
    pre = X @ W_x.T
    if g is not None:
        pre = pre + (g @ W_g.T).unsqueeze(1)                          # (W_g g) 1^T
    return _pool_f64(torch.tanh(pre) @ w_hx, X, real)


def alternating_reference(a, b, a_mask=None, b_mask=None, *, mech):
    """``(q^, v^)`` of eq. 6's three steps for ``Q = a^T``, ``V = b^T``, in float64."""
    p = {n: param_f64(t) for n, t in mech.named_parameters()}
    Q, V = a.double().cpu(), b.double().cpu()
    ra, rb = _real(a, a_mask), _real(b, b_mask)
    s = _guided_f64(Q, None, p["W_x1"], None, p["w_hx1"], ra)
    v_hat = _guided_f64(V, s, p["W_x2"], p["W_g2"], p["w_hx2"], rb)
    q_hat = _guided_f64(Q, v_hat, p["W_x3"], p["W_g3"], p["w_hx3"], ra)
    return q_hat, v_hat


def _lengths(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``(batch, n)`` bool right-padding masks: row 0 full, the others of seeded lengths."""
    lengths = torch.randint(1, n + 1, (batch,), generator=gen)
    lengths[0] = n
    return torch.arange(n).unsqueeze(0) < lengths.unsqueeze(1)


def _gate(reference):
    """The correctness gate of a pair mechanism: seeded ``a`` ``(batch, n, head_dim)`` and
    ``b`` of another length with padded rows, the module against ``reference``; the two
    summaries concatenated, ``(batch, 2 head_dim)``. A pair mechanism has no heads:
    ``num_heads`` only reaches ``create_for``."""

    def gate(spec, *, n, head_dim, num_heads, batch, dtype, causal, device, seed, hparams):
        del causal  # verify refuses causal=True first (causal=False)
        gen = torch.Generator().manual_seed(seed)
        nb = n + n // 2 + 1
        a, b = (torch.randn(batch, m, head_dim, generator=gen, dtype=torch.float64).to(dtype)
                for m in (n, nb))  # the reference reads these rounded values
        a_mask, b_mask = _lengths(batch, n, gen), _lengths(batch, nb, gen)
        hp = {**hparams, **spec.limit.hparams(n)}
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            mech = create_for(spec.name, head_dim=head_dim, num_heads=num_heads,
                              max_seq_len=nb, **hp).to(device).eval()
            a_hat, b_hat = mech(a.to(device), b.to(device), a_mask=a_mask.to(device),
                                b_mask=b_mask.to(device))
        ref = reference(a, b, a_mask, b_mask, mech=mech)
        return torch.cat([a_hat, b_hat], dim=-1), torch.cat(ref, dim=-1)

    return gate


# ---------------------------------------------------------------- the modules
def _check_seq(who: str, name: str, x, d: int, like=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor (B, N{name}, D); got "
                        f"{type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: {name} must be a floating-point tensor; got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{who}: {name} must be 3-D (B, N{name}, D) with D={d}; got "
                         f"{x.dim()}-D shape {format_shape(x)}")
    if x.shape[-1] != d:
        raise ValueError(f"{who}: {name} feature size {x.shape[-1]} does not match "
                         f"head_dim={d} the module was built with (shape {format_shape(x)})")
    if like is not None:
        if x.dtype != like.dtype or x.device != like.device:
            raise TypeError(f"{who}: b must have a's dtype and device ({like.dtype}, "
                            f"{like.device}); got {x.dtype}, {x.device}")
        if x.shape[0] != like.shape[0]:
            raise ValueError(f"{who}: a and b batch sizes differ: a {format_shape(like)}, "
                             f"b {format_shape(x)}")


def _check_mask(who: str, name: str, mask, x: torch.Tensor):
    if mask is None:
        return None
    seq = name.split("_")[0]
    want = f"(B, N{seq}) = {tuple(x.shape[:2])}"
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{who}: {name} must be a bool tensor {want} (True = real position, "
                        f"may be attended) or None; got {got}")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"{who}: {name} must have shape {want}, one entry per position of "
                         f"{seq} (nothing is broadcast); got {format_shape(mask)}")
    if mask.device != x.device:
        raise ValueError(f"{who}: {name} is on {mask.device}, {seq} on {x.device}")
    return mask


def _pool(scores, x, mask):
    """``(sum_i softmax(scores)_i x_i, weights)``: ``(B, D)`` and ``(B, N)``; masked
    positions get weight exactly 0 (:func:`masked_softmax`)."""
    p = masked_softmax(scores, mask)
    return (p.unsqueeze(1) @ x).squeeze(1), p


class _PairMechanism(Mechanism):
    """A mechanism of the pair contract: validated inputs to :meth:`_co_attend`."""

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.d = self.hp["head_dim"]
        self.k = self.hp["hidden_dim"] or self.d

    def _matrix(self, rows: int, cols: int) -> nn.Parameter:
        w = nn.Parameter(torch.empty(rows, cols))
        nn.init.xavier_uniform_(w)
        return w

    def _vector(self) -> nn.Parameter:
        return nn.Parameter(torch.empty(self.k).uniform_(-self.k ** -0.5, self.k ** -0.5))

    def forward(self, a, b, *, a_mask=None, b_mask=None, need_weights=False):
        """``(a_hat, b_hat)`` ``(B, D)`` each; ``need_weights``: ``((a_hat, b_hat),
        (a_weights (B, Na), b_weights (B, Nb)))``. See the module docstring."""
        who = self.spec.name
        _check_seq(who, "a", a, self.d)
        _check_seq(who, "b", b, self.d, like=a)
        a_mask, b_mask = _check_mask(who, "a_mask", a_mask, a), _check_mask(who, "b_mask",
                                                                               b_mask, b)
        need_weights = check_bool("need_weights", need_weights, who=who)
        work = work_dtype(a.dtype)  # half inputs in float32: tanh/softmax/sums
        # Padded features zeroed (not just skipped): garbage or NaN there cannot leak.
        Q = a.to(work) if a_mask is None else a.to(work).masked_fill(~a_mask.unsqueeze(-1), 0)
        V = b.to(work) if b_mask is None else b.to(work).masked_fill(~b_mask.unsqueeze(-1), 0)
        params = {n: p.to(work) for n, p in self.named_parameters()}
        (a_hat, a_w), (b_hat, b_w) = self._co_attend(Q, V, a_mask, b_mask, params)
        out = (a_hat.to(a.dtype), b_hat.to(a.dtype))
        return (out, (a_w.to(a.dtype), b_w.to(a.dtype))) if need_weights else out

    def _co_attend(self, Q, V, a_mask, b_mask, p):
        raise NotImplementedError


@register_mechanism(
    "co_attention_parallel",
    time="O(Na Nb (D + k) + (Na + Nb) D (D + k))",
    memory="O(Na Nb) = O(N^2): the affinity matrix C, the method",
    equation="C = tanh(Q^T W_b V); H^v = tanh(W_v V + (W_q Q) C), H^q = tanh(W_q Q + "
             "(W_v V) C^T); a^v = softmax(w_hv^T H^v), a^q = softmax(w_hq^T H^q); "
             "v^ = sum_n a^v_n v_n, q^ = sum_t a^q_t q_t",
    hparams=_HPARAMS,
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, eq. 3-5 (padded rows)",
                reference=None, gate=_gate(parallel_reference)),
    **_FLAGS,
)
class ParallelCoAttention(_PairMechanism):
    """Parallel co-attention (Lu et al. 2016, eq. 3-5): both attentions from one affinity C.

    ``W_b`` starts at ``N(0, 1/d^2)``: ``q^T W_b v`` of unit-variance ``d``-vectors then has
    unit variance (Xavier's ``1/d`` would give variance ``d`` and a saturated ``tanh``).
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.W_b = nn.Parameter(torch.randn(self.d, self.d) / self.d)
        self.W_q, self.W_v = self._matrix(self.k, self.d), self._matrix(self.k, self.d)
        self.w_hq, self.w_hv = self._vector(), self._vector()

    def _co_attend(self, Q, V, a_mask, b_mask, p):
        # Rows of Q, V are the paper's columns q_t, v_n; padded rows are 0, so their
        # entries of C are tanh(0) = 0 and they add nothing to the other side's H.
        C = torch.tanh((Q @ p["W_b"]) @ V.transpose(1, 2))             # (B, Na, Nb)
        WqQ, WvV = Q @ p["W_q"].T, V @ p["W_v"].T                      # (B, Na|Nb, k)
        H_v = torch.tanh(WvV + C.transpose(1, 2) @ WqQ)                # W_v V + (W_q Q) C
        H_q = torch.tanh(WqQ + C @ WvV)                                # W_q Q + (W_v V) C^T
        return _pool(H_q @ p["w_hq"], Q, a_mask), _pool(H_v @ p["w_hv"], V, b_mask)


@register_mechanism(
    "co_attention_alternating",
    time="O((Na + Nb) D k)",
    memory="O((Na + Nb) k)",
    equation="x^ = A(X; g): H = tanh(W_x X + (W_g g) 1^T), a^x = softmax(w_hx^T H), "
             "x^ = sum_i a^x_i x_i; s^ = A(Q; 0), v^ = A(V; s^), q^ = A(Q; v^)",
    hparams=_HPARAMS,
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, eq. 6 (padded rows)",
                reference=None, gate=_gate(alternating_reference)),
    **_FLAGS,
)
class AlternatingCoAttention(_PairMechanism):
    """Alternating co-attention (Lu et al. 2016, eq. 6): question, image, question again."""

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        k, d = self.k, self.d
        self.W_x1, self.w_hx1 = self._matrix(k, d), self._vector()     # s^ = A(Q; 0)
        self.W_x2, self.W_g2, self.w_hx2 = self._matrix(k, d), self._matrix(k, d), \
            self._vector()                                             # v^ = A(V; s^)
        self.W_x3, self.W_g3, self.w_hx3 = self._matrix(k, d), self._matrix(k, d), \
            self._vector()                                             # q^ = A(Q; v^)

    @staticmethod
    def _guided(X, g, W_x, W_g, w_hx, mask):
        pre = X @ W_x.T
        if g is not None:
            pre = pre + (g @ W_g.T).unsqueeze(1)                       # (W_g g) 1^T
        return _pool(torch.tanh(pre) @ w_hx, X, mask)

    def _co_attend(self, Q, V, a_mask, b_mask, p):
        s, _ = self._guided(Q, None, p["W_x1"], None, p["w_hx1"], a_mask)
        v_hat, a_v = self._guided(V, s, p["W_x2"], p["W_g2"], p["w_hx2"], b_mask)
        q_hat, a_q = self._guided(Q, v_hat, p["W_x3"], p["W_g3"], p["w_hx3"], a_mask)
        return (q_hat, a_q), (v_hat, a_v)
