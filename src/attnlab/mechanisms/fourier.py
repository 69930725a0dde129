"""Token mixing by Fourier transforms: no query, no key, no attention weights.

* **FNet** (Lee-Thorp et al. 2021) replaces self-attention by a parameter-free 2-D DFT,
  one along the sequence and one along the hidden dimension, keeping the real part:

  .. math:: y = \\Re\\big(\\mathcal{F}_{seq}(\\mathcal{F}_{hidden}(x))\\big)

* **Global filter** (Rao et al. 2021, GFNet; here its 1-D form) multiplies the sequence's
  spectrum by a learnable complex filter, one per channel, and transforms back:

  .. math:: \\tilde X = \\mathcal{F}[x], \\qquad x \\leftarrow \\mathcal{F}^{-1}[K \\odot
     \\tilde X], \\qquad K \\in \\mathbb{C}^{(N/2+1) \\times D}

  a circular convolution of each channel with the kernel ``h = F^{-1}[K]``.

Mapping onto the (q, k, v) contract: both mix the per-head values ``v`` (``(B, H, N, Dv)``);
``q`` and ``k`` are unused, and get exact zero gradients (through an empty slice of each,
as :func:`attnlab.mechanisms.base.empty_attention` does) rather than ``None``. The layer
around them (:class:`attnlab.nn.MultiheadAttention`) adds its own value and output
projections; with identity projections and one head they are the papers' blocks
(with ``H`` heads the hidden-dimension DFT of FNet runs over each head's ``Dv``).

``scale`` (default 1) multiplies the mixing matrix, as it multiplies the scores elsewhere:
1 is the papers' unnormalised DFT (FNet) and filter (GFNet); ``1 / sqrt(N Dv)`` makes
FNet's transform unitary. Self-attention only (``Nq == Nk``). Neither takes masks: every
output mixes every position, padding included, so ``attn_mask`` (key padding too) is
refused, and there are no weights to return or drop (``dropout_p > 0`` is refused). Half
precision is transformed in float32 (CPU FFTs take no float16) and returned as given.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from attnlab.contract import work_dtype
from attnlab.mechanisms.base import Mechanism
from attnlab.registry import REQUIRED, HParam, Limit, Paper, register_mechanism
from attnlab.verify import causal_allowed, param_f64

__all__ = ["FNet", "GlobalFilter", "fnet_reference", "global_filter_reference",
           "resample_filter"]

LEE_THORP_2021 = Paper(
    "FNet: Mixing Tokens with Fourier Transforms",
    "James Lee-Thorp, Joshua Ainslie, Ilya Eckstein, Santiago Ontanon",
    2021,
    "https://arxiv.org/abs/2105.03824",
)
RAO_2021 = Paper(
    "Global Filter Networks for Image Classification",
    "Yongming Rao, Wenliang Zhao, Zheng Zhu, Jiwen Lu, Jie Zhou",
    2021,
    "https://arxiv.org/abs/2107.00645",
)
_FLAGS = dict(family="fourier", arbitrary_mask=False, key_padding=False, cross=False,
              returns_weights=False)
_FILTER_STD = 0.02  # GFNet: torch.randn(h, w, dim, 2) * 0.02


def _no_dropout(name: str, dropout_p: float) -> None:
    if dropout_p > 0:
        raise ValueError(f"{name}: dropout_p={dropout_p} is not supported: it forms no "
                         f"attention weights to drop; pass 0")


def _with_unused(out: torch.Tensor, *unused: torch.Tensor) -> torch.Tensor:
    """``out`` plus an exact 0 that depends on ``unused``: their gradients are zeros (not
    ``None``), and no NaN even if they hold inf (the sum of an empty slice)."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in unused):
        return out
    return out + sum(t.flatten()[:0].sum() for t in unused)


# ---------------------------------------------------------------- float64 references
def _cos_sin(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of ``2 pi j k / n``, ``(n, n)`` float64, with ``j k`` reduced mod ``n``
    before the angle is formed (large products lose no digits)."""
    idx = torch.arange(n, dtype=torch.int64)
    angle = (2 * math.pi / n) * ((idx[:, None] * idx[None, :]) % n).double()
    return torch.cos(angle), torch.sin(angle)


def fnet_reference(q, k, v, *, mech, scale, is_causal):
    """``Re(F_N v F_D)`` as real DFT-matrix products: ``F = C - i S``, so the real part is
    ``C_N v C_D - S_N v S_D`` (no ``torch.fft``)."""
    C_n, S_n = _cos_sin(v.shape[-2])
    C_d, S_d = _cos_sin(v.shape[-1])
    out = C_n @ v @ C_d - S_n @ v @ S_d
    return out * (1.0 if scale is None else scale)


def global_filter_reference(q, k, v, *, mech, scale, is_causal):
    """``y = C v`` per channel with the circulant ``C[i, j] = h[(i - j) mod N]`` (its lower
    triangle when causal), ``h`` the real inverse DFT of the filter written as a sum of
    cosines and sines; the filter resampled with ``numpy.interp`` when ``N != L``."""
    N = v.shape[-2]
    w = param_f64(mech.complex_weight)                         # (H|1, L//2+1, D, 2)
    L = mech.hp["max_seq_len"]
    if N != L:
        src = np.arange(w.shape[1])
        at = np.arange(N // 2 + 1) * (L / N)
        w = torch.from_numpy(np.apply_along_axis(lambda c: np.interp(at, src, c), 1,
                                                 w.numpy()))
    re, im = w[..., 0], w[..., 1]                              # (H|1, N//2+1, D)
    f, m = torch.arange(N // 2 + 1), torch.arange(N)
    theta = (2 * math.pi / N) * ((m[:, None] * f[None, :]) % N).double()  # (N, N//2+1)
    # Each bin f of 0 < f < N/2 stands for f and N - f (Hermitian): twice its real part.
    weight = torch.full((N // 2 + 1,), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if N % 2 == 0:
        weight[-1] = 1.0
    h = (torch.einsum("mf,hfd->hmd", torch.cos(theta) * weight, re)
         - torch.einsum("mf,hfd->hmd", torch.sin(theta) * weight, im)) / N  # (H|1, N, D)
    lag = (torch.arange(N)[:, None] - torch.arange(N)[None, :]) % N
    C = h[:, lag, :].permute(0, 3, 1, 2)                       # (H|1, D, N, N)
    if is_causal:
        C = C * causal_allowed(N, N)
    out = torch.einsum("hdij,bhjd->bhid", C, v)
    return out * (1.0 if scale is None else scale)


# ---------------------------------------------------------------- FNet
@register_mechanism(
    "fnet",
    paper=LEE_THORP_2021,
    time="O(N Dv (log N + log Dv))",
    memory="O(N Dv)",
    equation="out = scale * Re(F_N v F_Dv)  (2-D DFT over the sequence and hidden dims; "
             "q, k unused),  scale = 1",
    # exact=False: the registry reads an exact, parameter-free mechanism as softmax
    # attention (conftest, demo, patterns). FNet computes its own formula exactly.
    exact=False,
    causal=False,
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, Re(fft2(v)) as DFT "
                "matrices", reference=fnet_reference),
    **_FLAGS,
)
class FNet(Mechanism):
    """FNet's Fourier sublayer: out = Re(fft2(v)) over each head's (N, Dv); no parameters.

    ``torch.fft.fft2`` (O(N Dv log(N Dv))) rather than FNet's DFT-matrix products, which the
    paper found faster on TPUs for short sequences only. ``q`` and ``k`` are ignored.
    """

    # Not A v for any (N, N) A: the hidden-dimension DFT mixes v's columns (read by
    # MultiheadAttention, which finds effective weights by attending v = I).
    effective_weights: ClassVar[bool] = False

    def default_scale(self, d: int) -> float:
        return 1.0

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        _no_dropout("fnet", dropout_p)
        y = torch.fft.fft2(v.to(work_dtype(v.dtype)), dim=(-2, -1)).real
        if scale != 1.0:
            y = y * scale
        return _with_unused(y.to(v.dtype), q, k), None


# ---------------------------------------------------------------- global filter
def resample_filter(w: torch.Tensor, L: int, n: int) -> torch.Tensor:
    """``w`` ``(H, L//2+1, D, 2)`` learned at length ``L``, at the bins of length ``n``:
    linear interpolation at the same frequency, ``f / n`` cycles per token, i.e. at the
    fractional bin ``t = f L / n`` of ``w`` (held at its last bin past it, for odd ``L``)."""
    last = L // 2
    t = (torch.arange(n // 2 + 1, dtype=torch.float64) * (L / n)).clamp(max=last)
    i0 = t.floor().long()
    i1 = (i0 + 1).clamp(max=last)
    frac = (t - i0).to(device=w.device, dtype=w.dtype)[:, None, None]
    return w[:, i0] * (1 - frac) + w[:, i1] * frac


@register_mechanism(
    "global_filter",
    paper=RAO_2021,
    time="O(N Dv log N)",
    memory="O(N Dv)",
    equation="out = scale * irfft(K * rfft(v, dim=N), dim=N),  K in C^(H x (N/2+1) x Dv) "
             "learned (a circular convolution per channel; causal: the circulant's lower "
             "triangle; q, k unused),  scale = 1",
    aliases=("gfnet",),
    exact=True,
    causal=True,
    learnable=True,
    hparams=[
        HParam("head_dim", int, REQUIRED, "size Dv of each value head (one filter per "
               "channel)", low=1),
        HParam("num_heads", int, REQUIRED, "heads H (one filter bank per head)", low=1),
        HParam("max_seq_len", int, REQUIRED, "L, the length the filter is learned at "
               "(L//2 + 1 frequency bins)", low=1),
        HParam("per_head", bool, True, "a filter bank per head (False: one shared by all)"),
        HParam("interpolate", bool, True, "other lengths N: resample the filter linearly "
               "in frequency (False: refuse N != max_seq_len)"),
    ],
    limit=Limit(hparams=lambda n: {}, note="exact: its own formula, the circulant of "
                "irfft(K) applied to v", reference=global_filter_reference),
    **_FLAGS,
)
class GlobalFilter(Mechanism):
    """GFNet's global filter, 1-D: each channel of v circularly convolved with irfft(K).

    ``K`` is stored as GFNet stores it, ``complex_weight`` ``(H or 1, L//2+1, Dv, 2)`` (real
    and imaginary parts), drawn from ``N(0, 0.02^2)`` as GFNet's. The paper's images have
    one fixed size; for another length ``N`` the filter is resampled, linearly at equal
    frequencies (GFNet interpolates its filters for other resolutions), or refused with
    ``interpolate=False``. An all-ones filter is the identity.

    Causal form (this lab's, not the paper's): the lower triangle of the same circulant,
    ``y_i = sum_{j <= i} h_{i-j} x_j``, a linear convolution with the kernel ``h`` of
    lags ``0 .. N-1``, computed with FFTs of length ``2N`` (no wrap-around).
    """

    # Not A v for any (N, N) A: each channel has its own filter (see FNet).
    effective_weights: ClassVar[bool] = False

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        heads = self.hp["num_heads"] if self.hp["per_head"] else 1
        bins = self.hp["max_seq_len"] // 2 + 1
        self.complex_weight = nn.Parameter(
            torch.randn(heads, bins, self.hp["head_dim"], 2) * _FILTER_STD)

    def default_scale(self, d: int) -> float:
        return 1.0

    def filter(self, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``K`` at length ``n``: complex ``(H or 1, n//2 + 1, Dv)`` of ``dtype``'s precision."""
        L = self.hp["max_seq_len"]
        w = self.complex_weight.to(dtype)
        if n != L:
            if not self.hp["interpolate"]:
                raise ValueError(
                    f"global_filter: sequence length N={n} differs from max_seq_len={L}, the "
                    f"length the filter was learned at, and interpolate=False; build it "
                    f"with max_seq_len={n} or interpolate=True")
            w = resample_filter(w, L, n)
        return torch.view_as_complex(w.contiguous())

    def _check(self, v) -> None:
        H, dv = v.shape[1], v.shape[-1]
        if dv != self.hp["head_dim"]:
            raise ValueError(f"global_filter: v head dim {dv} does not match head_dim="
                             f"{self.hp['head_dim']} (one filter per channel); create it "
                             f"with head_dim={dv}")
        if self.hp["per_head"] and H != self.hp["num_heads"]:
            raise ValueError(f"global_filter: num_heads={self.hp['num_heads']} (a filter bank "
                             f"per head) does not match the H={H} heads of v; build it with "
                             f"num_heads={H} or per_head=False")

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        _no_dropout("global_filter", dropout_p)
        self._check(v)
        n, work = v.shape[-2], work_dtype(v.dtype)
        K = self.filter(n, work)
        x = v.to(work)
        if is_causal:
            h = torch.fft.irfft(K, n=n, dim=-2)                        # lags 0 .. n-1
            X = torch.fft.rfft(x, n=2 * n, dim=-2)
            y = torch.fft.irfft(X * torch.fft.rfft(h, n=2 * n, dim=-2), n=2 * n, dim=-2)
            y = y[..., :n, :]
        else:
            y = torch.fft.irfft(torch.fft.rfft(x, dim=-2) * K, n=n, dim=-2)
        if scale != 1.0:
            y = y * scale
        return _with_unused(y.to(v.dtype), q, k), None
