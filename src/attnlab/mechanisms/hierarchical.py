"""H-Transformer-1D: hierarchical attention (Zhu & Soricut 2021, arXiv 2107.11906).

The attention matrix ``A = exp(tau Q K^T)`` is given the structure of a hierarchical
matrix (H-matrix): near the diagonal it is exact, far from it each block is replaced by
one computed on coarsened tokens, with blocks of ``Nr`` (``block_size``) coarse tokens at
every level. The paper's restriction (coarsening) of the token sequence, level ``l-1`` to
level ``l``, averages queries and keys and sums values over pairs of tokens::

    Q^(l)_I = (Q^(l-1)_2I + Q^(l-1)_2I+1) / 2,   K^(l) likewise,
    V^(l)_I =  V^(l-1)_2I + V^(l-1)_2I+1,        c^(l) (the row-sum vector 1) likewise,

so a level-``l`` token stands for ``2^l`` tokens and ``c^(l)_J = 2^l`` of them (fewer where
keys are padded: the means and sums run over real keys only, ``c`` counts them). With
``I, J`` the level-``l`` indices of fine tokens ``i, j`` and ``b^(l)(i) = floor(i / (Nr
2^l))`` the level-``l`` block of ``i``, the pairs are shared out among the levels:

* level 0 (exact): ``|b^(0)(i) - b^(0)(j)| <= 1``, the diagonal blocks and their super-
  and sub-diagonal neighbours (the tridiagonal ``A^(0)``);
* level ``l >= 1``: ``|b^(l)(i) - b^(l)(j)| = 1`` (the neighbour blocks at level ``l``),
  less the corner that level ``l-1`` already holds (its own neighbour pair); each pair is
  counted once, at the finest level whose blocks are neighbours.

The output is normalised attention over all levels, the paper's ``Y = Y^(0) + P^(0)(Y~^(1)
+ P^(1)(Y~^(2) + ...))`` divided by the same sum applied to the coarsened row sums::

    out_i = sum_{(l, J) in S_i} exp(tau Q^(l)_I . K^(l)_J) V^(l)_J
            / sum_{(l, J) in S_i} exp(tau Q^(l)_I . K^(l)_J) c^(l)_J

where ``P`` interpolates (repeats each coarse row to its ``2`` finer ones). Each level's
rows are exponentiated against their own maximum and the levels are combined with a
shared one (a log-sum-exp across levels, ``log c`` added to the scores), so large scores
neither overflow nor underflow the other levels.

**Levels.** ``num_levels`` coarse levels, by default (``None``) as many as it takes for
every pair to be held, ``L = ceil(log2(ceil(N / Nr))) - 1`` (0 when ``N <= 2 Nr``: exact
attention); an int caps it (``min(num_levels, L)``, pairs beyond the last level are not
attended). ``N`` is padded to a multiple of ``Nr 2^L`` (fewer than ``N + Nr`` added) with
keys that are masked and queries left out of the averages, so the result is that of the
formula on ``N`` tokens. Time ``O(N Nr D)``, memory ``O(N (Nr + D))``: blocks only, never ``N x N``.

**Causal form** (the paper's: causal diagonal blocks and sub-diagonal blocks only, the
pairs ``j <= i`` of the pattern above). One change from the paper: the queries are *not*
averaged, each query ``q_i`` scores the coarse keys itself, since an average over a coarse
token includes the queries after ``i`` and would let future tokens change ``out_i``. Keys
and values of a sub-diagonal block all lie before the query's block. This costs ``O(N Nr
D)`` per level, ``O(N Nr D log(N / Nr))`` in all.

**Key padding** (bool ``attn_mask`` ``(B, H, 1, N)``, ``False`` = padded): a padded token
is left out of every average and sum (keys, values and queries; its own query row is still
computed), as the internal padding is. Right padding therefore gives the real rows of the
unpadded sequence. Dropout acts on each level's entries (a coarse entry drops its ``c``
pairs together); arbitrary masks, cross-attention and weights are refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnlab.contract import work_dtype
from attnlab.mechanisms.base import Mechanism, by_heads, key_padding_keep
from attnlab.registry import HParam, Limit, Paper, register_mechanism

__all__ = ["HierarchicalAttention", "levels_for", "padded_length"]

ZHU_2021 = Paper("H-Transformer-1D: Fast One-Dimensional Hierarchical Attention for Sequences",
                 "Zhenhai Zhu, Radu Soricut", 2021, "https://arxiv.org/abs/2107.11906")


def levels_for(n: int, block_size: int, num_levels: int | None = None) -> int:
    """Coarse levels used at length ``n``: ``ceil(log2(ceil(n / Nr))) - 1`` (at least 0),
    the fewest that hold every pair, capped by ``num_levels`` when it is given."""
    nb = -(-n // block_size)
    full = max(0, (nb - 1).bit_length() - 1)
    return full if num_levels is None else min(num_levels, full)


def padded_length(n: int, block_size: int, levels: int) -> int:
    """``n`` rounded up to a multiple of ``Nr 2^levels`` (whole blocks at every level)."""
    unit = block_size << levels
    return -(-n // unit) * unit


def _blocks(x: torch.Tensor, nr: int) -> torch.Tensor:
    """``(B, H, n, *)`` -> ``(B, H, n / nr, nr, *)``."""
    return x.reshape(*x.shape[:2], x.shape[2] // nr, nr, *x.shape[3:])


def _neighbours(x: torch.Tensor, offsets: tuple[int, ...], fill: float = 0.0) -> torch.Tensor:
    """Blocks ``I + o`` for each offset ``o`` in ``offsets`` (``-1, 0, 1``), joined along the
    block's token dim: ``(B, H, nb, nr, *)`` -> ``(B, H, nb, len(offsets) nr, *)``; blocks
    beyond either end are ``fill``."""
    nb = x.shape[2]
    pad = [0, 0] * (x.dim() - 3) + [1, 1]
    xp = F.pad(x, pad, value=fill)
    return torch.cat([xp[:, :, 1 + o:1 + o + nb] for o in offsets], dim=3)


def _coarsen(x: torch.Tensor) -> torch.Tensor:
    """Sum of pairs along the length: ``(B, H, n, *)`` -> ``(B, H, n / 2, *)``."""
    return x.reshape(*x.shape[:2], x.shape[2] // 2, 2, *x.shape[3:]).sum(dim=3)


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return total / count.clamp(min=1).unsqueeze(-1)


def _log_count(count: torch.Tensor) -> torch.Tensor:
    """``log c``, ``-inf`` where a coarse key holds no real key (it is masked)."""
    return torch.where(count > 0, count.clamp(min=1).log(), -math.inf)


def _softmax_parts(logits, values, dropout_p):
    """``(num, den, m)`` of one level: ``m`` its rows' (detached) max, ``-inf`` for a row
    with no key; ``num = sum exp(s - m) v``, ``den = sum exp(s - m)`` (values are means,
    ``log c`` is in the logits). The max only stabilises: detaching it changes no gradient."""
    m = logits.detach().amax(dim=-1)
    p = torch.exp(logits - torch.where(torch.isinf(m), 0.0, m).unsqueeze(-1))
    den = p.sum(dim=-1)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return p @ values, den, m


def _merge(a, b):
    """Two levels' ``(num, den, m)`` at the same rows, against their shared max."""
    m = torch.maximum(a[2], b[2])
    shift = torch.where(torch.isinf(m), 0.0, m)
    fa, fb = torch.exp(a[2] - shift), torch.exp(b[2] - shift)
    return (a[0] * fa.unsqueeze(-1) + b[0] * fb.unsqueeze(-1), a[1] * fa + b[1] * fb, m)


def _interpolate(parts, rows: int):
    """The paper's ``P``: each coarse row repeated to the ``rows`` rows it stands for."""
    r = rows // parts[1].shape[-1]
    return tuple(t.repeat_interleave(r, dim=2) for t in parts) if r > 1 else parts


def _corner_mask(rows: int, nr: int, offsets: tuple[int, ...], device) -> torch.Tensor:
    """``(rows, len(offsets) nr)`` bool, False on the corner of a level-``l`` neighbour block
    that level ``l-1`` holds: the query half next to the key block's near half."""
    half_q = torch.arange(rows, device=device) >= rows // 2  # second half of the block
    half_k = torch.arange(nr, device=device) >= nr // 2
    parts = []
    for o in offsets:
        near_q = half_q if o > 0 else ~half_q  # rows next to the neighbour block
        near_k = ~half_k if o > 0 else half_k
        parts.append(~(near_q[:, None] & near_k[None, :]))
    return torch.cat(parts, dim=1)


@register_mechanism(
    "hierarchical", family="hierarchical", paper=ZHU_2021,
    time="O(N Nr D) (causal: O(N Nr D log(N / Nr)))",
    memory="O(N (Nr + D)); causal with autograd O(N Nr log(N / Nr))",
    equation="out_i = sum_{(l,J) in S_i} exp(tau Q^(l)_I . K^(l)_J) V^(l)_J / "
             "sum_{(l,J) in S_i} exp(tau Q^(l)_I . K^(l)_J) c^(l)_J; Q^(l), K^(l) means and "
             "V^(l), c^(l) sums over 2^l tokens; S_i: level 0 tridiagonal Nr-blocks, level l "
             "neighbour blocks less what level l-1 holds (causal: j <= i, fine queries)",
    exact=False, causal=True, arbitrary_mask=False, key_padding=True, cross=False,
    returns_weights=False, half_precision=True,
    aliases=("h_transformer_1d", "htransformer"),
    hparams=[
        HParam("block_size", int, 16, "Nr: tokens per block at every level; even, so that "
               "a coarse token never straddles two blocks of the level below", low=2,
               multiple_of=2),
        HParam("num_levels", int, None, "coarse levels; None = derived from N, "
               "ceil(log2(ceil(N / Nr))) - 1, the fewest that hold every pair", low=0,
               nullable=True),
    ],
    tiny_hparams=dict(block_size=2),
    limit=Limit(hparams=lambda n: {"block_size": n + n % 2},
                note="block_size >= N: one block, exact softmax attention"),
)
class HierarchicalAttention(Mechanism):
    """H-Transformer-1D: exact tridiagonal blocks, coarsened neighbour blocks above them.

    ``block_size`` is the paper's ``Nr`` (even, so that a level-``l`` token never straddles
    two level-``l-1`` blocks); ``num_levels`` caps the coarse levels (``None``: all that
    ``N`` needs). See the module docstring for the formula and the causal form.
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)

    def levels(self, n: int) -> int:
        """Coarse levels used at length ``n`` (:func:`levels_for`)."""
        return levels_for(n, self.hp["block_size"], self.hp["num_levels"])

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        n, nr = q.shape[2], self.hp["block_size"]
        np_ = padded_length(n, nr, self.levels(n))
        per_head = np_ * (3 * nr + 2 * (q.shape[-1] + v.shape[-1]))

        def heads(q, k, v, mask, _):
            return self._attend_heads(q, k, v, mask, is_causal, scale, dropout_p)

        return by_heads(heads, q, k, v, attn_mask, per_head), None

    def _attend_heads(self, q, k, v, attn_mask, is_causal, scale, dropout_p):
        dtype, work = q.dtype, work_dtype(q.dtype)
        B, H, n, _ = q.shape
        nr, L = self.hp["block_size"], self.levels(n)
        np_ = padded_length(n, nr, L)
        keep = key_padding_keep(attn_mask, B, H, n)
        keep = torch.ones(1, 1, n, dtype=torch.bool, device=q.device) if keep is None else keep
        keep = F.pad(keep, (0, np_ - n), value=False)  # internal padding: absent tokens
        q, k, v = (F.pad(t.to(work), (0, 0, 0, np_ - n)) for t in (q, k, v))
        # Absent tokens reach nothing (not even as inf * 0): zeroed before any sum.
        q_sum, k_sum, v_sum = (t.masked_fill(~keep.unsqueeze(-1), 0.0) for t in (q, k, v))
        count = keep.to(work).expand(B, H, np_)
        parts = None
        for level, (qs, ks, vs, c) in reversed(list(enumerate(
                self._hierarchy(q_sum, k_sum, v_sum, count, L)))):
            if level == 0:
                new = self._level0(q, k_sum, v_sum, c, is_causal, scale, dropout_p)
            elif is_causal:
                new = self._causal_level(q, ks, vs, c, level, scale, dropout_p)
            else:
                new = self._level(qs, ks, vs, c, scale, dropout_p)
            parts = new if parts is None else _merge(_interpolate(parts, new[1].shape[-1]), new)
        num, den, _ = parts
        out = num / torch.where(den > 0, den, 1.0).unsqueeze(-1)  # no key at all: zeros
        return out[:, :, :n].to(dtype)

    @staticmethod
    def _hierarchy(q_sum, k_sum, v_sum, count, levels):
        """Per level ``(Q, K, V, c)``: means of the real tokens (``V`` too, as ``log c`` is
        added to the scores) and the count ``c`` of real keys in each coarse token."""
        out = [(None, None, None, count)]
        for _ in range(levels):
            q_sum, k_sum, v_sum, count = (_coarsen(t) for t in (q_sum, k_sum, v_sum, count))
            out.append((_mean(q_sum, count), _mean(k_sum, count), _mean(v_sum, count), count))
        return out

    def _level0(self, q, k, v, count, is_causal, scale, dropout_p):
        """Exact attention on the tridiagonal blocks (causal: sub-diagonal and causal
        diagonal blocks), rows at full resolution."""
        nr = self.hp["block_size"]
        offsets = (-1, 0) if is_causal else (-1, 0, 1)
        bias = torch.where(count > 0, 0.0, -math.inf)
        keys, values = _neighbours(_blocks(k, nr), offsets), _neighbours(_blocks(v, nr), offsets)
        bias = _neighbours(_blocks(bias, nr), offsets, fill=-math.inf).unsqueeze(-2)
        logits = scale * (_blocks(q, nr) @ keys.transpose(-2, -1)) + bias
        if is_causal:  # within the diagonal block, j <= i
            tri = torch.ones(nr, nr, dtype=torch.bool, device=q.device).tril()
            allowed = torch.cat([torch.ones_like(tri), tri], dim=1)
            logits = logits.masked_fill(~allowed, -math.inf)
        return self._rows(logits, values, dropout_p)

    def _level(self, qs, ks, vs, count, scale, dropout_p):
        """Level ``l >= 1``: each coarse query block attends its two neighbour blocks, less
        the corners the level below holds; rows at this level's resolution."""
        nr, offsets = self.hp["block_size"], (-1, 1)
        keys, values = _neighbours(_blocks(ks, nr), offsets), _neighbours(_blocks(vs, nr), offsets)
        bias = _neighbours(_blocks(_log_count(count), nr), offsets, fill=-math.inf)
        logits = scale * (_blocks(qs, nr) @ keys.transpose(-2, -1)) + bias.unsqueeze(-2)
        corner = _corner_mask(nr, nr, offsets, qs.device)
        return self._rows(logits.masked_fill(~corner, -math.inf), values, dropout_p)

    def _causal_level(self, q, ks, vs, count, level, scale, dropout_p):
        """Causal level ``l >= 1``: the fine queries of each level-``l`` block attend the
        coarse keys of the block before it (less the corner the level below holds)."""
        nr, rows = self.hp["block_size"], self.hp["block_size"] << level
        keys, values = _neighbours(_blocks(ks, nr), (-1,)), _neighbours(_blocks(vs, nr), (-1,))
        bias = _neighbours(_blocks(_log_count(count), nr), (-1,), fill=-math.inf)
        logits = scale * (_blocks(q, rows) @ keys.transpose(-2, -1)) + bias.unsqueeze(-2)
        corner = _corner_mask(rows, nr, (-1,), q.device)
        return self._rows(logits.masked_fill(~corner, -math.inf), values, dropout_p)

    @staticmethod
    def _rows(logits, values, dropout_p):
        """One level's ``(num, den, m)`` with the blocks' rows laid out along the length."""
        num, den, m = _softmax_parts(logits, values, dropout_p)
        B, H = num.shape[:2]
        return num.reshape(B, H, -1, num.shape[-1]), den.reshape(B, H, -1), m.reshape(B, H, -1)
