"""Relative position schemes that act inside attention: RoPE and ALiBi.

Neither adds anything to the token embeddings. RoPE rotates queries and keys so their
dot product depends only on the position *difference*; ALiBi adds a per-head linear
penalty on the distance to the scores. Both therefore need nothing learned and
extrapolate (to some degree) past the training length.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnlab.contract import check_positions
from attnlab.util.checks import check_float, check_int

__all__ = ["RotaryEmbedding", "alibi_bias", "alibi_slopes"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dim (the GPT-NeoX / LLaMA pairing)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    r"""Rotary position embedding (Su et al. 2021, "RoFormer", arXiv:2104.09864).

    A vector at position :math:`m` is multiplied by the block-diagonal rotation
    :math:`R^d_{\Theta,m}`, computed as in the paper's efficient form (§3.4.2):

    .. math::
        f(x, m)_i = x_i \cos(m\theta_i) - x_{i+d/2} \sin(m\theta_i), \quad
        f(x, m)_{i+d/2} = x_{i+d/2} \cos(m\theta_i) + x_i \sin(m\theta_i),

    with :math:`\theta_i = \text{base}^{-2i/d}`, :math:`i = 0 \dots d/2 - 1`. In complex
    form, :math:`z_i = x_i + \mathrm{i}\,x_{i+d/2}` becomes :math:`z_i e^{\mathrm{i} m
    \theta_i}`, so :math:`\langle f(q, m), f(k, n)\rangle = \mathrm{Re}\sum_i q_i
    \bar k_i e^{\mathrm{i}(m-n)\theta_i}` depends only on :math:`m - n`.

    Pairs are ``(i, i + d/2)`` ("rotate half", as in GPT-NeoX and LLaMA-HF), not the
    paper's adjacent ``(2i, 2i+1)``; the two are the same map up to a fixed permutation
    of the head dimension, which the learned projections absorb.

    ``forward(q, k, offset)`` rotates both at positions ``offset, offset+1, ...`` along
    dim ``-2``: with a KV cache, the new tokens' queries and keys are rotated at their
    absolute positions and the cached keys were rotated when they were new.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        head_dim = check_int("head_dim", head_dim, who="RotaryEmbedding")
        if head_dim % 2:
            raise ValueError(
                f"RotaryEmbedding: head_dim must be even (dimensions are rotated in pairs); "
                f"got head_dim={head_dim}"
            )
        base = check_float("base", base, who="RotaryEmbedding")
        if base <= 1.0:
            raise ValueError(f"RotaryEmbedding: base must be a finite number > 1; got {base!r}")
        self.head_dim = head_dim
        self.base = base
        # Tables are derived data: non-persistent, so state_dicts stay free of them.
        self.register_buffer("_cos", torch.empty(0, head_dim), persistent=False)
        self.register_buffer("_sin", torch.empty(0, head_dim), persistent=False)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"

    def _angles(self, n: int, device, dtype: torch.dtype) -> torch.Tensor:
        """``(n, d)`` angles ``m * theta_i``, each theta repeated for both halves."""
        half = self.head_dim // 2
        i = torch.arange(half, device=device, dtype=dtype)
        inv_freq = self.base ** (-2.0 * i / self.head_dim)
        ang = torch.outer(torch.arange(n, device=device, dtype=dtype), inv_freq)
        return torch.cat((ang, ang), dim=-1)

    def tables(self, n: int, device=None, dtype: torch.dtype = torch.float32):
        """``cos`` and ``sin`` tables ``(n, head_dim)`` for positions ``0 .. n-1``."""
        if dtype == torch.float64:
            # The float32 cache would cost float64 callers ~1e-7 of accuracy; recompute.
            ang = self._angles(n, device, torch.float64)
            return ang.cos(), ang.sin()
        device = torch.device(device or "cpu")
        # module.to(half) casts buffers too: the tables are kept (rebuilt) in float32.
        stale = self._cos.dtype != torch.float32 or self._cos.device != device
        if stale or self._cos.shape[0] < n:
            # Grow geometrically so a slowly lengthening sequence rebuilds O(log N) times.
            size = max(n, 2 * self._cos.shape[0], 16)
            ang = self._angles(size, device, torch.float32)
            self._cos, self._sin = ang.cos(), ang.sin()
        return self._cos[:n].to(dtype), self._sin[:n].to(dtype)

    def rotate(self, x: torch.Tensor, offset: int = 0,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate ``x`` ``(..., N, head_dim)`` as if its first row sat at ``offset``, or
        row ``i`` at ``positions[i]`` (``(N,)`` integers, any order: a shard of a longer
        sequence)."""
        cos, sin = self._cos_sin(x, offset, positions)
        return x * cos + _rotate_half(x) * sin

    def _cos_sin(self, x: torch.Tensor, offset: int, positions: torch.Tensor | None):
        """The ``(N, head_dim)`` tables for ``x``'s rows, its arguments checked."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(
                f"RotaryEmbedding: last dim of x must be head_dim={self.head_dim}; "
                f"got shape {tuple(x.shape)}"
            )
        offset = check_int("offset", offset, low=0, who="RotaryEmbedding")
        n = x.shape[-2]
        if positions is None:
            cos, sin = self.tables(offset + n, x.device, x.dtype)
            return cos[offset:], sin[offset:]
        if offset:
            raise ValueError(f"RotaryEmbedding: offset must be 0 when positions are "
                             f"given (they are absolute); got offset={offset}")
        at = check_positions("RotaryEmbedding", "positions", positions, n).to(x.device)
        cos, sin = self.tables(int(at.max()) + 1 if n else 0, x.device, x.dtype)
        return cos[at], sin[at]

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0,
                positions: torch.Tensor | None = None):
        """Rotated ``(q, k)``; both start at position ``offset`` (lengths may differ), or
        sit at ``positions`` (self-attention: one per token of both, so the tables are
        looked up once for the two)."""
        if positions is None:
            return self.rotate(q, offset), self.rotate(k, offset)
        if k.shape[-2:] != q.shape[-2:]:
            raise ValueError(f"RotaryEmbedding: with positions, k must hold the same tokens "
                             f"as q (same length and head_dim); got q {tuple(q.shape)}, k "
                             f"{tuple(k.shape)}")
        cos, sin = self._cos_sin(q, offset, positions)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def alibi_slopes(num_heads: int) -> torch.Tensor:
    r"""Per-head ALiBi slopes :math:`m_h` (Press et al. 2022, "Train Short, Test Long").

    For :math:`n` a power of two the slopes are the geometric sequence starting at and
    with ratio :math:`2^{-8/n}`:

    .. math:: m_h = 2^{-8h/n}, \quad h = 1 \dots n

    (8 heads: 1/2, 1/4, ..., 1/256). Otherwise, as in the authors' reference code, with
    :math:`p = 2^{\lfloor \log_2 n \rfloor}`: the :math:`p` slopes for :math:`p` heads,
    then the first :math:`n - p` of the odd-numbered slopes for :math:`2p` heads,
    :math:`m = 2^{-8(2j-1)/(2p)}`, :math:`j = 1 \dots n-p`, which interleave the first ones.

    Returns a float32 tensor ``(num_heads,)``.
    """
    num_heads = check_int("num_heads", num_heads, who="alibi_slopes")
    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * h / p) for h in range(1, p + 1)]
    slopes += [2.0 ** (-8.0 * (2 * j - 1) / (2 * p)) for j in range(1, num_heads - p + 1)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(
    num_heads: int,
    nq: int,
    nk: int,
    device=None,
    dtype: torch.dtype = torch.float32,
    causal: bool = False,
    *,
    offset: int = 0,
) -> torch.Tensor:
    r"""ALiBi additive score bias ``(1, num_heads, nq, nk)`` (Press et al. 2022, eq. in §3):

    .. math:: \mathrm{softmax}(q_i K^\top + m_h \cdot [-(i-1), \dots, -2, -1, 0])

    i.e. ``bias[h, i, j] = -m_h * (i - j)`` for the keys ``j <= i`` a causal model sees.
    With ``causal=True`` the future (``j > i``) is also set to ``-inf``, so the bias is a
    complete causal mask by itself; with ``causal=False`` (bidirectional/encoder use) the
    penalty is symmetric, ``-m_h * |i - j|``. Query ``i`` sits at position ``offset + i``
    (keys at ``0 .. nk-1``), for decoding with a KV cache; ``offset=0`` aligns top-left
    like :mod:`attnlab.contract`'s ``is_causal``.

    It is a *float* ``attn_mask``: only mechanisms whose spec has ``arbitrary_mask`` can
    take it.
    """
    num_heads, nq, nk = (check_int(name, value, who="alibi_bias")
                         for name, value in (("num_heads", num_heads), ("nq", nq), ("nk", nk)))
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"alibi_bias: dtype must be a floating torch.dtype; got {dtype!r}")
    offset = check_int("offset", offset, low=0, who="alibi_bias")
    # Distances in float32 at least: i - j is exact there up to 2^24 tokens.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    i = torch.arange(offset, offset + nq, device=device, dtype=work)[:, None]
    j = torch.arange(nk, device=device, dtype=work)[None, :]
    dist = i - j                                                   # (nq, nk), > 0 = past
    m = alibi_slopes(num_heads).to(device=device, dtype=work)[:, None, None]
    if causal:
        bias = (-m * dist).masked_fill(dist < 0, float("-inf"))
    else:
        bias = -m * dist.abs()
    return bias.unsqueeze(0).to(dtype)
