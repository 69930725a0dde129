"""Kernel (linear) attention: softmax's ``exp(q.k)`` replaced by a feature-map product.

With a feature map ``phi`` (``D -> F``, positive), attention becomes associative:

.. math::

    O_i = \\frac{\\phi(Q_i)^\\top \\sum_j \\phi(K_j) V_j^\\top}
               {\\phi(Q_i)^\\top \\sum_j \\phi(K_j)}
        = \\frac{\\phi(Q_i)^\\top S}{\\phi(Q_i)^\\top z}, \\qquad
    S = \\sum_j \\phi(K_j) V_j^\\top \\ (F \\times D_v), \\quad z = \\sum_j \\phi(K_j)

so the ``(Nq, Nk)`` matrix is never formed: ``O(N F Dv)`` time. The causal form takes
prefix sums ``S_i = sum_{j<=i} phi(K_j) V_j^T``, ``z_i = sum_{j<=i} phi(K_j)``, chunk by
chunk with a hand-written backward (:mod:`attnlab.mechanisms._engines.kernel_causal`):
``O(N (F + Dv))`` memory.

* ``linear``    -- Katharopoulos et al. 2020: ``phi(x) = elu(x) + 1``.
* ``performer`` -- Choromanski et al. 2021 (FAVOR+): positive orthogonal random features
  ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` with ``x = x * scale^(1/2)``, an unbiased
  estimate of the softmax kernel ``exp(scale q.k)``.
* ``cosformer`` -- Qin et al. 2022: ``ReLU`` features re-weighted by
  ``cos(pi/2 (i - j) / M) = cos(a_i) cos(a_j) + sin(a_i) sin(a_j)``, ``a_i = pi i / (2M)``.

Conventions shared by the three: the denominator is floored, ``O_i = num_i / max(den_i,
eps)`` (rows whose features vanish give zeros, never NaN; the Performer's true ``den_i``,
whatever shifts stabilise its features); ``scale`` (default 1 for
``linear`` and ``cosformer``) multiplies the query before the feature map, except in the
Performer, which puts ``scale^(1/2)`` on both q and k (default ``1/sqrt(D)``, as softmax);
features and sums are computed in float32 for half-precision inputs. No mechanism here
forms attention weights, so arbitrary masks, ``need_weights`` and weight dropout are
refused with a clear error.
Causal with ``Nq != Nk`` is top-left aligned (key ``j`` allowed iff ``j <= i``).
**Decoding** (:meth:`~attnlab.Mechanism.decode`) keeps the causal form's ``S, z``
(:mod:`attnlab.mechanisms._engines.kernel_decode`): the Performer's with its keys' running
max, in eval mode; cosFormer's needs ``max_seq_len`` (one ``M`` for the whole sequence).

**Key padding** (a bool ``attn_mask`` ``(B, H, 1, Nk)``, ``False`` = padded key) is exact:
a padded key contributes nothing, its feature row ``phi(K_j)`` is zeroed in both ``S`` and
``z`` (as the masked sums of Katharopoulos et al.'s reference code, ``K = K * mask``
after the feature map). Padded keys and values are zeroed first, so their content never
reaches the output or its gradient, and the Performer's stabilising maxima are taken
over real keys only. The output rows of the real tokens therefore equal the mechanism
run on the unpadded sequence (same random features; causal too; cosFormer positions enter
only as ``i - j``, so any contiguous block of real tokens, with a fixed ``max_seq_len``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnlab.contract import work_dtype
from attnlab.mechanisms._engines.favor import (  # re-exported: all but three
    decode_favor,
    favor_features,
    orthogonal_gaussian,
    peaked_inputs,
    performer_gate,
    performer_limit_inputs,
    row_floor,
)
from attnlab.mechanisms._engines.kernel_causal import kernel_attention  # re-exported
from attnlab.mechanisms._engines.kernel_decode import check_positions, decode_mechanism
from attnlab.mechanisms.base import Mechanism, by_heads, key_padding_keep
from attnlab.registry import REQUIRED, HParam, Limit, Paper, register_mechanism
from attnlab.verify import causal_allowed

__all__ = ["CosFormerAttention", "LinearAttention", "PerformerAttention", "kernel_attention",
           "orthogonal_gaussian", "peaked_inputs", "performer_gate", "performer_limit_inputs"]

KATHAROPOULOS_2020 = Paper(
    "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
    "Angelos Katharopoulos, Apoorv Vyas, Nikolaos Pappas, François Fleuret",
    2020,
    "https://arxiv.org/abs/2006.16236",
)
CHOROMANSKI_2021 = Paper(
    "Rethinking Attention with Performers",
    "Krzysztof Choromanski, Valerii Likhosherstov, David Dohan, Xingyou Song, Andreea Gane, "
    "Tamas Sarlos, Peter Hawkins, Jared Davis, Afroz Mohiuddin, Lukasz Kaiser, David Belanger, "
    "Lucy Colwell, Adrian Weller",
    2021,
    "https://arxiv.org/abs/2009.14794",
)
QIN_2022 = Paper(
    "cosFormer: Rethinking Softmax in Attention",
    "Zhen Qin, Weixuan Sun, Hui Deng, Dongxu Li, Yunshen Wei, Baohong Lv, Junjie Yan, "
    "Lingpeng Kong, Yiran Zhong",
    2022,
    "https://arxiv.org/abs/2202.08791",
)

_FLAGS = dict(family="kernel", exact=False, causal=True, arbitrary_mask=False, key_padding=True,
              cross=True, returns_weights=False, half_precision=True, learnable=False,
              decode_state=True)
_CHUNK = HParam("chunk_size", int, 64, "rows per chunk of the causal prefix sums", low=1)


def _eps(default: float) -> HParam:
    return HParam("eps", float, default, "floor of the denominator phi(q).z", low=0.0,
                  low_exclusive=True)


# ------------------------------------------------------------------ float64 references
# For the correctness gate (attnlab.verify): each kernel's O(N^2) form written plainly in
# float64, with the full (Nq, Nk) matrix of pair weights A_ij = phi(q_i) . phi(k_j).
def _weighted_average(A, v, is_causal, eps):
    """O_i = sum_j A_ij v_j / max(sum_j A_ij, eps), only j <= i when causal."""
    if is_causal:
        A = A * causal_allowed(A.shape[-2], A.shape[-1])
    return (A @ v) / A.sum(dim=-1, keepdim=True).clamp_min(eps)


def linear_reference(q, k, v, *, mech, scale, is_causal):
    """Katharopoulos et al. eq. 6: phi(x) = elu(x) + 1, scale (default 1) on q."""
    def phi(x):
        return torch.where(x > 0, x + 1.0, torch.exp(x))
    A = phi(q * (1.0 if scale is None else scale)) @ phi(k).transpose(-2, -1)
    return _weighted_average(A, v, is_causal, mech.hp["eps"])


def cosformer_reference(q, k, v, *, mech, scale, is_causal):
    """Qin et al. eq. 10: A_ij = relu(q_i) . relu(k_j) cos(pi/2 (i - j) / M)."""
    nq, nk = q.shape[-2], k.shape[-2]
    M = mech.hp["max_seq_len"] or max(nq, nk)
    i = torch.arange(nq, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(nk, dtype=torch.float64).unsqueeze(0)
    q = q * (1.0 if scale is None else scale)
    A = torch.relu(q) @ torch.relu(k).transpose(-2, -1) * torch.cos(math.pi / 2 * (i - j) / M)
    return _weighted_average(A, v, is_causal, mech.hp["eps"])


# ----------------------------------------------------------------------------- mechanisms
class _KernelMechanism(Mechanism):
    """Shared ``_attend``: features in float32 (or float64), then :func:`kernel_attention`."""

    def _features(self, q, k, is_causal, scale, keep):
        """``(phi_q, phi_k, log_scale or None, floor)`` for work-dtype ``q, k``; ``keep``
        (``(B, H, Nk)`` bool or None) marks the real keys, whose rows alone must matter;
        ``floor`` is ``eps`` in the units the engine holds each row's denominator in
        (a float, or ``(B, H, Nq, 1)`` for shifted features)."""
        raise NotImplementedError

    def _feature_size(self, d: int) -> int:
        """``F``, the size of ``phi(x)`` for a head of size ``d``."""
        return d

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        name = self.spec.name
        if dropout_p > 0:
            raise ValueError(f"{name}: dropout_p={dropout_p} is not supported: kernel attention "
                             f"never forms the attention weights it would drop; pass 0")
        # Heads are independent: a few at a time, so that the (N, F) feature maps of one
        # slice, not of all H heads, set the peak (the Performer's 256 features at 16K
        # tokens and 8 heads made 650 MiB of them).
        per_head = max(q.shape[2], k.shape[2]) * self._feature_size(q.shape[-1])

        def heads(q, k, v, mask, _):
            return self._attend_heads(q, k, v, mask, is_causal, scale)

        return by_heads(heads, q, k, v, attn_mask, per_head), None

    def _attend_heads(self, q, k, v, attn_mask, is_causal, scale):
        dtype, work = q.dtype, work_dtype(q.dtype)
        q, k, v = q.to(work), k.to(work), v.to(work)
        keep = key_padding_keep(attn_mask, *k.shape[:3])
        if keep is not None:  # padded content must reach nothing, not even as inf * 0
            k, v = (t.masked_fill(~keep.unsqueeze(-1), 0.0) for t in (k, v))
        phi_q, phi_k, log_scale, floor = self._features(q, k, is_causal, scale, keep)
        if keep is not None:  # a padded key adds nothing to S or z
            phi_k = phi_k * keep.unsqueeze(-1).to(phi_k.dtype)
        out = kernel_attention(phi_q, phi_k, v, is_causal, floor, self.hp["chunk_size"],
                               log_scale)
        return out.to(dtype)

    # Decoding (spec decode_state): the causal form's state S, z continued (the engine
    # kernel_decode); the Performer's keeps its keys' running max too (engine favor).
    _running_max = False

    def _decode_features(self, q, k, scale, state):
        """``(phi_q, phi_k, None)`` of the new positions ``t .. t+n-1``, continuing ``state``."""
        return self._features(q, k, True, scale, None)[:3]

    def _decode(self, q, k, v, state, scale):
        return decode_mechanism(self, q, k, v, state, scale)


@register_mechanism(
    "linear",
    paper=KATHAROPOULOS_2020,
    time="O(N D Dv) (causal: O(N chunk D + N D Dv))",
    memory="O(N (D + Dv) + chunk^2 + D Dv)",
    equation="V'_i = phi(Q_i)^T sum_j phi(K_j) V_j^T / (phi(Q_i)^T sum_j phi(K_j)), "
             "phi(x) = elu(x) + 1  (causal: sums over j <= i)",
    aliases=("linear_attention", "linear_transformer"),
    hparams=[_CHUNK, _eps(1e-6)],
    tiny_hparams={"chunk_size": 4},
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, phi(x) = elu(x) + 1",
                reference=linear_reference),
    **_FLAGS,
)
class LinearAttention(_KernelMechanism):
    """Linear attention (Katharopoulos et al. 2020): phi(x) = elu(x) + 1 feature maps.

    Eq. 6 of the paper, ``V'_i = phi(Q_i)^T sum_j phi(K_j) V_j^T / phi(Q_i)^T sum_j
    phi(K_j)``; causal (eq. 8-9): ``S_i = sum_{j<=i} phi(K_j) V_j^T``, ``Z_i = sum_{j<=i}
    phi(K_j)``. The paper has no scale: ``scale`` defaults to 1 and, if given, multiplies
    ``Q`` before ``phi`` (a temperature on the query features). The reference code adds
    ``eps`` to the denominator; here it floors it (identical unless it would vanish).
    """

    def default_scale(self, d: int) -> float:
        return 1.0

    def _features(self, q, k, is_causal, scale, keep):
        # add_ in place is safe: elu's backward reads its input, not its output.
        phi_q = F.elu(q if scale == 1.0 else q * scale).add_(1.0)
        return phi_q, F.elu(k).add_(1.0), None, self.hp["eps"]


@register_mechanism(
    "performer",
    paper=CHOROMANSKI_2021,
    time="O(N m (D + Dv)) (causal: + O(N chunk m))",
    memory="O(N (m + D + Dv) + chunk^2 + m Dv)",
    equation="Att(Q, K, V) ~ D^-1 (Q' ((K')^T V)), D = diag(Q' ((K')^T 1)), "
             "phi(x) = exp(w_i^T x - |x|^2/2)_i / sqrt(m), w_i orthogonal, x = x scale^(1/2)",
    aliases=("favor", "favor_plus"),
    hparams=[
        HParam("head_dim", int, REQUIRED, "size D of each query/key head", low=1),
        HParam("num_features", int, 256, "number m of random features", low=1),
        HParam("redraw", bool, False, "draw new features at every forward in training mode"),
        HParam("seed", int, None, "seed of the features (None: torch's global RNG)", low=0,
               nullable=True),
        HParam("kernel_eps", float, 1e-4, "added to every (shifted) feature, as the reference "
               "implementation does: it keeps a few large features from dominating the "
               "denominator (0 = the plain unbiased estimator)", low=0.0),
        _CHUNK,
        _eps(1e-12),
    ],
    tiny_hparams={"num_features": 16, "chunk_size": 4},
    # FAVOR+ is unbiased, exact only as m -> infinity (error ~ 1/sqrt(m)): 8192 plain
    # (kernel_eps = 0) features on inputs with a small estimator variance
    # (performer_limit_inputs). Measured over D in 8..128, N in 16..512 and 5-40 seeds, the
    # Monte Carlo error stays <= 0.032 (causal <= 0.015), while non-causally a scale off
    # by 2x (>= 0.17) or 0.5x (>= 0.08), scale instead of sqrt(scale) on q and k (>= 0.12)
    # or a dropped |x|^2/2 normalisation (>= 0.059) exceed tol = 0.05. Causally the early
    # rows (few keys, large outputs) set the scale of the metric: only the 2x error is
    # caught reliably there (>= 0.06). 16384 features cost 2x and do not remove the tail.
    # The gate adds a check of its own equation on peaked inputs (performer_gate), where
    # shifts of tens are applied: a floor in shifted units (errors of 0.2-2) fails it.
    limit=Limit(hparams=lambda n: {"num_features": 8192, "kernel_eps": 0.0},
                note="8192 random features, small |q|, |k|: softmax attention within MC "
                     "error; and its own equation on peaked inputs",
                tol=0.05, inputs=performer_limit_inputs, statistical=True, gate=performer_gate),
    **_FLAGS,
)
class PerformerAttention(_KernelMechanism):
    """Performer (Choromanski et al. 2021): FAVOR+ positive orthogonal random features.

    ``phi(x) = exp(-|x|^2/2) / sqrt(m) (exp(w_1^T x), ..., exp(w_m^T x))`` (Lemma 1's
    positive features, with ``x = q scale^(1/2)`` so that ``E[phi(q)^T phi(k)] =
    exp(scale q^T k)``), and ``Att = D^-1 (Q' ((K')^T V))`` (eq. 6). The ``w_i`` are rows
    of orthogonal ``D x D`` blocks with chi(D)-distributed norms, kept as the buffer
    ``projection`` ``(m, D)``; :meth:`redraw_features` draws new ones (every forward in
    training mode if ``redraw=True``), from a private generator when ``seed`` is given.

    Stability: ``exp`` arguments are shifted by constants that cancel in ``O_i``: per query
    its own max (as the reference code); for keys the global max (non-causal, as the
    reference code) or, causally, the running max over keys ``j' <= j`` -- a global max
    would let future keys change past outputs. ``kernel_eps`` (1e-4, as performer-pytorch)
    is added to every shifted feature: a small bias towards uniform weights that keeps a
    few large features from dominating the estimate (``kernel_eps=0`` gives the plain
    unbiased estimator; its maxima are then of the whole exponent). ``eps`` floors the
    *true* denominator ``phi(q_i)^T z``: the engines compare with ``eps`` in each row's
    shifted units (:mod:`attnlab.mechanisms._engines.favor`).
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        seed = self.hp["seed"]
        self._gen = None if seed is None else torch.Generator().manual_seed(seed)
        self.register_buffer("projection", self._draw())

    def _draw(self) -> torch.Tensor:
        return orthogonal_gaussian(self.hp["num_features"], self.hp["head_dim"], self._gen)

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Replace ``projection`` by a fresh draw (same device and dtype)."""
        self.projection.copy_(self._draw())

    def _feature_size(self, d: int) -> int:
        return self.hp["num_features"]

    def _attend(self, q, *args):
        if self.hp["redraw"] and self.training:
            self.redraw_features()  # once per call: every slice of heads shares the draw
        return super()._attend(q, *args)

    _running_max = True

    def _decode(self, q, k, v, state, scale):
        return decode_favor(self, q, k, v, state, scale)

    def _features(self, q, k, is_causal, scale, keep):
        if q.shape[-1] != self.hp["head_dim"]:
            raise ValueError(
                f"performer: q head dim {q.shape[-1]} does not match head_dim="
                f"{self.hp['head_dim']} the features were drawn for; create it with "
                f"head_dim={q.shape[-1]}")
        phi_q, phi_k, log_scale, units = favor_features(
            q, k, self.projection, scale, self.hp["kernel_eps"], is_causal, keep)
        return phi_q, phi_k, log_scale, row_floor(self.hp["eps"], units)


@register_mechanism(
    "cosformer",
    paper=QIN_2022,
    time="O(N D Dv) (causal: O(N chunk D + N D Dv))",
    memory="O(N (D + Dv) + chunk^2 + D Dv)",
    equation="O_i = sum_j s_ij V_j / sum_j s_ij, s_ij = ReLU(Q_i) ReLU(K_j)^T "
             "cos(pi/2 (i - j)/M) = Q^cos_i K^cos_j^T + Q^sin_i K^sin_j^T",
    hparams=[
        HParam("max_seq_len", int, None, "M of the cos re-weighting (None: max(Nq, Nk) of "
               "each call)", low=1, nullable=True),
        _CHUNK,
        _eps(1e-6),
    ],
    tiny_hparams={"chunk_size": 4},
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, relu features, cos reweighting",
                reference=cosformer_reference),
    **_FLAGS,
)
class CosFormerAttention(_KernelMechanism):
    """cosFormer (Qin et al. 2022): ReLU features with a cos(pi/2 (i-j)/M) re-weighting.

    Eq. 10 of the paper: ``s(Q'_i, K'_j) = Q'_i K'_j^T cos(pi/2 x (i - j)/M)`` with
    ``Q' = ReLU(Q)``, ``K' = ReLU(K)``, decomposed (eq. 11) as ``Q^cos_i = Q'_i cos(pi i /
    2M)``, ``Q^sin_i = Q'_i sin(pi i / 2M)`` (same for K), i.e. features ``[Q^cos, Q^sin]``
    of size 2D. ``M`` is ``max_seq_len`` if given (set it for autoregressive use, so that
    the weights do not depend on the sequence length), else ``max(Nq, Nk)`` as in the
    reference code; positions must stay below ``M`` so that every weight is positive.
    ``scale`` (default 1) multiplies ``Q``; ReLU is positively homogeneous, so it cancels
    except against ``eps``.
    """

    def default_scale(self, d: int) -> float:
        return 1.0

    def _feature_size(self, d: int) -> int:
        return 2 * d

    def _features(self, q, k, is_causal, scale, keep):
        nq, nk = q.shape[-2], k.shape[-2]
        M = self.hp["max_seq_len"]
        if M is None:
            M = max(nq, nk)
        elif max(nq, nk) > M:
            raise ValueError(f"cosformer: max_seq_len={M} must be >= N=max(Nq, Nk)="
                             f"{max(nq, nk)} (cos(pi/2 (i-j)/M) needs |i - j| < M)")
        return _cos_sin(q * scale, 0, M), _cos_sin(k, 0, M), None, self.hp["eps"]

    def _decode_features(self, q, k, scale, state):
        # Absolute positions t .. t+n-1 against one M for the whole sequence.
        M, t = self.hp["max_seq_len"], 0 if state is None else state["t"]
        check_positions("cosformer", M, t, q.shape[-2])
        return _cos_sin(q * scale, t, M), _cos_sin(k, t, M), None


def _cos_sin(x, start: int, M: int):
    """``[ReLU(x_i) cos(pi i / 2M), ReLU(x_i) sin(pi i / 2M)]`` at positions ``start + i``."""
    a = torch.arange(start, start + x.shape[-2], device=x.device, dtype=x.dtype)
    a = a * (math.pi / (2 * M))
    r = torch.relu(x)
    return torch.cat([r * a.cos().unsqueeze(-1), r * a.sin().unsqueeze(-1)], dim=-1)
