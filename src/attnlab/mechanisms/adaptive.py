"""Adaptive attention span: each head learns how far back it looks.

Sukhbaatar et al. 2019 give head ``h`` a span ``z_h in [0, S]`` (``S = max_span``) and
weight key ``r`` of query ``t`` by a soft mask of their distance ``x = t - r``:

.. math::

    m_z(x) = \\min\\!\\Big(\\max\\!\\Big(\\frac{R + z - x}{R},\\ 0\\Big),\\ 1\\Big), \\qquad
    a_{tr} = \\frac{m_z(t - r)\\, \\exp(s_{tr})}{\\sum_{q} m_z(t - q)\\, \\exp(s_{tq})}, \\qquad
    s_{tr} = \\tau\\, q_t^\\top k_r + M_{tr}

``R`` (``ramp``) is the width of the linear ramp from 1 to 0, which makes ``m_z``
differentiable in ``z``; an L1 penalty ``(lambda / H) sum_h z_h`` (:meth:`span_loss`) pulls
the spans down. As in the authors' code, ``z_h = S * zeta_h`` with a learnable fraction
``zeta_h in [0, 1]`` (``init_span`` is its initial value), and keys further back than ``S``
are never attended (the model's memory holds ``S`` tokens).

**It really crops.** No key at distance ``>= W = min(ceil(max_h z_h) + R, S, N)`` gets any
weight, so only those are computed: queries are cut into blocks of ``b`` rows and block
``[i0, i0 + b)`` gathers the keys ``[i0 - W + 1, i0 + b)`` (an ``unfold`` of the padded
keys), giving ``(N/b) x b x (b + W - 1)`` scores instead of ``N x N``: time ``O(N (W + b) D)``,
memory ``O(N (W + b))``. ``attn_mask`` is gathered the same way, tile by tile, so any mask
is honoured without ever forming an ``N x N`` tensor (a mask the caller passes at full
size is of course already ``N x N``).

Forms. ``is_causal=True`` is the paper's (language modelling) form, ``x = t - r >= 0``.
With ``is_causal=False`` attnlab extends it to a bidirectional span, ``x = |t - r|`` (keys
``[i0 - W + 1, i0 + b + W - 1)`` per block): an extension, not in the paper. Relative
position embeddings of the paper's model belong to the surrounding layer, not here.
The weights are computed as ``softmax(s + log m)`` (equal to the formula above, and
stable): ``m = 0`` becomes ``-inf`` and fully masked rows give zeros.

Decoding (registry flag ``decode_state``): no key further back than ``S`` is ever seen,
so the state is a rolling buffer of the last ``S - 1`` keys and values
(:mod:`attnlab.mechanisms._engines.window_decode`), whatever the spans learned; each new
query scores only the ``W`` of them its heads' spans reach, as the forward does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.contract import masked_softmax, work_dtype
from attnlab.mechanisms._engines.window_decode import Window, decode_softmax
from attnlab.mechanisms.base import Mechanism, by_heads
from attnlab.registry import REQUIRED, HParam, Limit, Paper, register_mechanism

__all__ = ["AdaptiveSpanAttention"]

SUKHBAATAR_2019 = Paper(
    "Adaptive Attention Span in Transformers",
    "Sainbayar Sukhbaatar, Edouard Grave, Piotr Bojanowski, Armand Joulin",
    2019,
    "https://arxiv.org/abs/1905.07799",
)


def _pad(t: torch.Tensor, dim: int, before: int, after: int, value) -> torch.Tensor:
    """Pad one dim with a constant (``torch.cat``: works for bool tensors too)."""
    if before == 0 and after == 0:
        return t
    parts = []
    for n in (before, after):
        shape = list(t.shape)
        shape[dim] = n
        parts.append(t.new_full(shape, value))
    return torch.cat([parts[0], t, parts[1]], dim=dim)


class _Band:
    """Geometry of the blocked band: ``nb`` query blocks of ``b`` rows, each seeing the ``L``
    padded keys ``[blk*b, blk*b + L)``; key ``c`` of block ``blk`` is the real key
    ``j = blk*b + c - (W - 1)`` and its distance to local query ``r`` is ``r - c + W - 1``."""

    def __init__(self, n: int, w: int, b: int, causal: bool) -> None:
        self.n, self.w, self.b, self.causal = n, w, b, causal
        self.nb = -(-n // b)
        self.L = b + (w - 1) * (1 if causal else 2)
        self.left = w - 1
        self.right = (self.nb - 1) * b + self.L - self.left - n

    def keys(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, D)`` -> the windows ``(B, H, nb, L, D)`` (a view of the padded keys)."""
        tp = _pad(t, 2, self.left, self.right, 0.0)
        return tp.unfold(2, self.L, self.b).transpose(-1, -2)

    def key_index(self, device) -> torch.Tensor:
        """``(nb, 1, L)`` real key index ``j`` of every window slot (may be out of range)."""
        blk = torch.arange(self.nb, device=device).view(-1, 1, 1)
        c = torch.arange(self.L, device=device).view(1, 1, -1)
        return blk * self.b + c - self.left

    def distance(self, device) -> torch.Tensor:
        """``(b, L)`` signed distance ``i - j`` of local query ``r`` to window slot ``c``."""
        r = torch.arange(self.b, device=device).view(-1, 1)
        c = torch.arange(self.L, device=device).view(1, -1)
        return r - c + self.left

    def mask_tiles(self, mask: torch.Tensor, fill) -> torch.Tensor:
        """A 4-D broadcastable ``(., ., Nq|1, Nk|1)`` mask -> ``(., ., nb|1, b|1, L|1)`` tiles,
        gathered with views (``unfold`` + ``diagonal``): never an ``N x N`` intermediate."""
        rows, cols = mask.shape[-2] != 1, mask.shape[-1] != 1
        m = _pad(mask, 2, 0, self.nb * self.b - self.n, fill) if rows else mask
        if not cols:
            return m.unflatten(2, (self.nb, self.b)) if rows else m.unsqueeze(2)
        m = _pad(m, 3, self.left, self.right, fill).unfold(3, self.L, self.b)  # (.,.,Nq|1,nb,L)
        if not rows:
            return m.transpose(2, 3)                                            # (.,.,nb,1,L)
        m = m.unflatten(2, (self.nb, self.b))                                   # (.,.,nb,b,nb,L)
        return torch.diagonal(m, dim1=2, dim2=4).permute(0, 1, 4, 2, 3)         # (.,.,nb,b,L)


@register_mechanism(
    "adaptive_span",
    family="adaptive",
    paper=SUKHBAATAR_2019,
    time="O(N S D), S = min(max_h z_h + R, max_span) (+ block_size)",
    memory="O(N S)",
    equation="a_tr = m_z(t-r) exp(s_tr) / sum_q m_z(t-q) exp(s_tq),  "
             "m_z(x) = clamp((R + z - x) / R, 0, 1),  s = scale * q k^T + M,  x = t - r",
    exact=False, causal=True, arbitrary_mask=True, cross=False, returns_weights=True,
    half_precision=True, learnable=True, decode_state=True,
    aliases=("adaptive_attention_span",),
    hparams=[
        HParam("num_heads", int, REQUIRED, "heads H (one span per head)", low=1),
        HParam("max_span", int, 1024, "S: the longest span; keys further back are never seen",
               low=1),
        HParam("ramp", int, 32, "R: width of the soft mask's ramp from 1 to 0", low=1),
        HParam("init_span", float, 0.0, "initial span as a fraction of max_span (z = S * "
               "init_span)", low=0.0, high=1.0),
        HParam("span_loss_coef", float, 2e-6, "lambda of the L1 span penalty span_loss()",
               low=0.0),
        HParam("block_size", int, 64, "queries per block of the cropped computation", low=1),
    ],
    tiny_hparams={"max_span": 8, "ramp": 2, "init_span": 0.5, "block_size": 4},
    # z = max_span * init_span = N: m_z(x) = 1 for every distance x < N, so the weights are
    # softmax's; the user's ramp and block_size stay (the band is still cut into blocks).
    limit=Limit(hparams=lambda n: {"max_span": n, "init_span": 1.0},
                note="span z = max_span = N: full attention"),
)
class AdaptiveSpanAttention(Mechanism):
    """Adaptive attention span: each head soft-masks keys beyond its learned span z_h.

    Symbols as in the paper (Sukhbaatar et al. 2019, eq. 3-4): ``m_z(x) = clamp((R + z -
    x)/R, 0, 1)`` with ``x`` the query-key distance, ``R = ramp``, ``z_h = max_span *
    span_frac[h]`` learned per head, and ``a_tr = m_z(t-r) exp(s_tr) / sum_q m_z(t-q)
    exp(s_tq)``. Only keys within ``ceil(max_h z_h) + R`` (and ``max_span``) of each query
    are computed, block by block. Call :meth:`span_loss` to add the paper's L1 penalty to
    the training loss and :meth:`clamp_spans` after each optimiser step (the forward
    clamps too). ``spans`` holds the current ``z_h``. ``need_weights=True`` scatters the band
    into dense ``(B, H, N, N)`` weights for that call only (``O(N^2)`` memory then).
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.span_frac = nn.Parameter(torch.full((self.hp["num_heads"],), self.hp["init_span"]))

    @property
    def spans(self) -> torch.Tensor:
        """The current spans ``z_h = max_span * clamp(span_frac, 0, 1)`` (tokens, detached)."""
        return self.hp["max_span"] * self.span_frac.detach().clamp(0.0, 1.0)

    def span_loss(self) -> torch.Tensor:
        """``lambda * mean_h z_h``: the paper's ``(lambda / M) sum_i z_i`` for this layer's heads
        (on the raw parameter, so it keeps pulling even past a bound)."""
        return self.hp["span_loss_coef"] * self.hp["max_span"] * self.span_frac.mean()

    @torch.no_grad()
    def clamp_spans(self) -> None:
        """Keep ``z_h`` in ``[0, max_span]``; call after each optimiser step, as the paper."""
        self.span_frac.clamp_(0.0, 1.0)

    def window(self, n: int) -> int:
        """``W``: keys at distance ``>= W`` get weight 0 for every head at length ``n``."""
        z_max = float(self.spans.max())
        return max(1, min(math.ceil(z_max) + self.hp["ramp"], self.hp["max_span"], n))

    def _check_heads(self, q) -> None:
        H = q.shape[1]
        if H != self.hp["num_heads"]:
            raise ValueError(
                f"adaptive_span: num_heads={self.hp['num_heads']} (one span per head) does "
                f"not match the H={H} heads of q; build it with num_heads={H}"
            )

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        B, H, N, _ = q.shape
        self._check_heads(q)
        band = _Band(N, self.window(N), min(self.hp["block_size"], N), is_causal)
        if need_weights:  # dense (B, H, N, N) weights: O(N^2) anyway, all heads at once
            return self._attend_heads(q, k, v, attn_mask, slice(None), band, scale,
                                      dropout_p, True)

        # A few heads at a time (the band W is every head's): one slice's (N, b + W)
        # scores and weights, not all H heads', set the peak.
        def heads(q, k, v, mask, s):
            return self._attend_heads(q, k, v, mask, s, band, scale, dropout_p, False)[0]

        return by_heads(heads, q, k, v, attn_mask, band.nb * band.b * band.L), None

    def _attend_heads(self, q, k, v, attn_mask, heads, band, scale, dropout_p, need_weights):
        """The cropped band for these ``heads`` (a slice of the spans): ``(out, weights)``."""
        B, H, N, _ = q.shape
        wdt = work_dtype(q.dtype)
        nb, b, L, W, is_causal = band.nb, band.b, band.L, band.w, band.causal

        # Soft mask per head over the band, (1, H, 1, b, L); the hard limits (future keys
        # when causal, distance >= W) are folded in as m = 0.
        x = band.distance(q.device)
        dist = x if is_causal else x.abs()
        R = float(self.hp["ramp"])
        z = self.hp["max_span"] * self.span_frac[heads].to(wdt).clamp(0.0, 1.0)
        m = ((R + z.view(H, 1, 1) - dist.to(wdt)) / R).clamp(0.0, 1.0)
        m = m * ((dist >= 0) & (dist < W)).to(wdt)
        # log m, with -inf (and no NaN gradient) where m = 0.
        tiny = torch.finfo(wdt).tiny
        log_m = torch.where(m > 0, m.clamp_min(tiny).log(), float("-inf"))
        log_m = log_m.view(1, H, 1, b, L)

        # scale is folded into q: one pass over N x D instead of one over the scores.
        qb = _pad(q.to(wdt) * scale, 2, 0, nb * b - N, 0.0).unflatten(2, (nb, b))  # (B,H,nb,b,D)
        kw = band.keys(k.to(wdt))                                                  # (B,H,nb,L,D)
        vw = band.keys(v.to(wdt))                                                  # (B,H,nb,L,Dv)
        s = torch.matmul(qb, kw.transpose(-1, -2)).add_(log_m)                     # (B,H,nb,b,L)

        j = band.key_index(q.device)
        allowed = (j >= 0) & (j < N)                                       # (nb, 1, L)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                allowed = allowed & band.mask_tiles(attn_mask, False)
            else:
                s = s + band.mask_tiles(attn_mask, 0.0).to(wdt)
        p = masked_softmax(s, allowed)
        p_used = F.dropout(p, dropout_p) if dropout_p > 0 else p
        out = torch.matmul(p_used, vw).flatten(2, 3)[:, :, :N].to(v.dtype)

        weights = None
        if need_weights:  # the dense (B, H, N, N) weights, for this call only (O(N^2))
            # Window slot -> its key column; slots outside [0, N) (weight 0) go to a spare
            # column N that is cut off.
            idx = torch.where((j >= 0) & (j < N), j, N).expand(B, H, nb, b, L)
            full = p.new_zeros(B, H, nb, b, N + 1).scatter(-1, idx, p)
            weights = full.flatten(2, 3)[:, :, :N, :N].to(v.dtype)
        return out, weights

    def _decode(self, q, k, v, state, scale):
        """The last ``max_span - 1`` keys kept; ``softmax(s + log m_z(i - j))`` over ``W``."""
        self._check_heads(q)
        S, R = self.hp["max_span"], float(self.hp["ramp"])
        wdt, W = work_dtype(q.dtype), self.window(self.hp["max_span"])
        z = (S * self.span_frac.to(wdt).clamp(0.0, 1.0)).view(-1, 1, 1)
        tiny = torch.finfo(wdt).tiny

        def log_m(i, j):  # (H, c, L): the forward's soft mask, -inf where m = 0
            dist = (i - j).to(wdt)
            m = ((R + z - dist) / R).clamp(0.0, 1.0) * (dist < W).to(wdt)
            return torch.where(m > 0, m.clamp_min(tiny).log(), float("-inf"))

        return decode_softmax(self, q, k, v, state, scale, Window(S, reach=W), bias=log_m)
