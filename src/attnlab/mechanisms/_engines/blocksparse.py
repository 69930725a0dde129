"""The block-sparse engine behind every mechanism of the ``sparse`` family.

A sparse pattern allows query ``i`` to attend only the keys of a set :math:`S_i`:

.. math::

    \\mathrm{out}_i = \\sum_{j \\in S_i} \\frac{\\exp(\\tau\\, q_i \\cdot k_j + M_{ij})}
                      {\\sum_{j' \\in S_i} \\exp(\\tau\\, q_i \\cdot k_{j'} + M_{ij'})}\\, v_j

Every pattern is given at two levels:

1. a **block layout**: tokens are cut into blocks of ``b`` (``block_size``) and query block
   ``I`` lists the key blocks ``J`` holding at least one allowed pair. It is derived
   analytically from the pattern (never by evaluating ``N x N`` pairs) and is a superset:
   an extra block costs time, never correctness;
2. a **token predicate** ``allows(q_idx, kv_idx)`` (a FlexAttention ``mask_mod``) that
   decides the pairs inside those blocks.

Every pattern of :mod:`attnlab.mechanisms.sparse` is a union of a few primitive terms
(:class:`SparsePattern`): a dilated band ``lo <= j - i <= hi, (j - i) % d == 0``, same
``L``-block ``i // L == j // L``, stride ``(i - j) % l == 0``, summary columns
``j % l >= l - c``, global tokens (``g[i] or g[j]``) and explicit blocks ``A[i//b, j//b]``;
``is_causal`` intersects with ``j <= i``. One predicate, :func:`allows`, reads all of them
from tensors, so FlexAttention compiles *one* kernel for every pattern and parameter.

Two backends, both sparse (hyperparameter ``backend``):

* ``blocked`` (PyTorch, plain autograd): query blocks are grouped by how many key blocks
  they need; each group gathers only its key/value blocks (``index_select`` into
  ``(B, H, r, c*b, D)``), scores them, applies the predicate and the caller's ``attn_mask``
  tile (gathered at the same positions: both must allow a pair), a masked softmax (a row
  with no allowed key gives 0, with zero gradient) and the weighted sum. With ``K`` keys
  scored per query, time is ``O(N K D)``. With autograd, memory is ``O(N K)`` for the
  scores plus ``O(N K D / b)`` for the gathered blocks (the backward needs them): each
  group gathers its blocks once and scores them in chunks of at most ``_CHUNK``. Without
  autograd each chunk gathers its own blocks and writes its rows straight into the
  output, so the forward's peak is the output plus one chunk (``_CHUNK`` scores, and as
  many gathered key/value elements), ``O(N D)`` whatever ``K``: a pattern whose ``K``
  grows with ``N`` (``sparse_transformer``) then costs time, not memory.
* ``flex`` (in :mod:`attnlab.mechanisms._engines.sparse_flex`):
  ``torch.nn.attention.flex_attention`` compiled once per process, with a
  ``BlockMask`` built straight from the layout (``BlockMask.from_kv_blocks``; blocks whose
  every pair is allowed are marked *full*), cached with the plan. A bool ``attn_mask`` is
  and-ed in ``mask_mod``, a float one added in ``score_mod``; rows with no allowed key
  give 0. FlexAttention on CPU (torch 2.13) has no backward and takes float32/16/bf16 only.
* ``auto`` (default) is ``flex`` on CUDA when FlexAttention can run the call (no dropout,
  a supported dtype, ``b % 16 == 0``) and ``blocked`` otherwise, in particular always on
  CPU: there ``blocked`` needs no compilation (seconds per pattern shape) and has a
  backward. An explicit ``flex`` that cannot run raises the reason (on CPU with inputs
  that need a gradient: ``NotImplementedError``); it never silently switches backend.
  ``flex`` compiles one static kernel per (length, dtype, block size, mask kind): on CPU
  it is about 4x faster than ``blocked`` for repeated no-grad calls at a fixed shape, but
  past torch's recompile limit (8 shapes) torch runs FlexAttention eagerly, densely.

``N`` need not be a multiple of ``b``: queries are padded to whole blocks and the padded
rows dropped; padded key positions are masked out. Plans (layout, groups, predicate
tiles, flex block masks) are cached per (pattern, N, causal, device) in a small LRU.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.nn.attention.flex_attention import BlockMask

from attnlab.contract import work_dtype

__all__ = ["Rule", "SparsePattern", "allows", "blocked_attention", "plan_for"]

_CHUNK = 1 << 22  # scores per chunk of query blocks: bounds the forward's peak memory
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 32


class Rule(NamedTuple):
    """The token predicate's parameters, all tensors (FlexAttention then compiles once)."""

    causal: torch.Tensor  # bool: intersect with j <= i
    band_lo: torch.Tensor  # band lo <= j - i <= hi with (j - i) % dil == 0 (lo > hi: off)
    band_hi: torch.Tensor
    dil: torch.Tensor
    local_on: torch.Tensor  # bool: i // local == j // local
    local: torch.Tensor
    stride_on: torch.Tensor  # bool: (i - j) % stride == 0
    stride: torch.Tensor
    sum_l: torch.Tensor  # j % sum_l >= sum_l - sum_c (sum_c = 0: off)
    sum_c: torch.Tensor
    is_global: torch.Tensor  # (N,) bool
    bsz: torch.Tensor  # block size of ``blocks``
    blocks: torch.Tensor  # (nqb, nkb) bool: explicitly allowed blocks


def allows(r: Rule, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Whether query ``q`` may attend key ``k`` (broadcasting index tensors, ``< N``)."""
    d = k - q
    ok = (d >= r.band_lo) & (d <= r.band_hi) & (d % r.dil == 0)
    ok = ok | (r.local_on & (q // r.local == k // r.local))
    ok = ok | (r.stride_on & ((q - k) % r.stride == 0))
    ok = ok | (k % r.sum_l >= r.sum_l - r.sum_c)
    ok = ok | r.is_global[q] | r.is_global[k]
    ok = ok | r.blocks[q // r.bsz, k // r.bsz]
    return ok & (~r.causal | (k <= q))


def _circular_overlap(x, lx, y, ly, m):
    """Do ``[x, x+lx)`` and ``[y, y+ly)`` meet on the integers mod ``m``?"""
    if lx >= m or ly >= m:
        return torch.ones_like(x - y, dtype=torch.bool)
    return ((y - x) % m < lx) | ((x - y) % m < ly)


@dataclass(frozen=True)
class SparsePattern:
    """A union of primitive terms (``None``/0 = term absent) on ``n`` tokens."""

    n: int
    block_size: int
    causal: bool
    band: tuple[int, int, int] | None = None  # (lo, hi, dilation), offsets j - i
    local: int = 0
    stride: int = 0
    summary: tuple[int, int] | None = None  # (l, c)
    global_tokens: tuple[int, ...] = ()  # normalised to 0 <= g < n
    blocks: torch.Tensor | None = None  # (nqb, nkb) bool at block_size
    key: tuple = ()  # what identifies ``blocks`` (e.g. a seed) for the caches

    @property
    def num_blocks(self) -> int:
        return -(-self.n // self.block_size)

    def cache_key(self, device) -> tuple:
        return (self.n, self.block_size, self.causal, self.band, self.local, self.stride,
                self.summary, self.global_tokens, self.key, str(device))

    def block_layout(self) -> torch.Tensor:
        """``(nqb, nkb)`` bool: the key blocks each query block needs (a superset)."""
        b, nb = self.block_size, self.num_blocks
        q0 = torch.arange(nb).unsqueeze(1) * b  # first token of each query block
        q1 = (q0 + b - 1).clamp(max=self.n - 1)
        k0 = torch.arange(nb).unsqueeze(0) * b
        k1 = k0 + b - 1
        lay = torch.zeros(nb, nb, dtype=torch.bool)
        if self.band is not None:
            lo, hi, dil = self.band
            # Some offset j - i in [lo, hi]; with dilation, some offset also = 0 mod dil.
            band = (k1 - q0 >= lo) & (k0 - q1 <= hi)
            if dil > 1:
                band &= _circular_overlap(q0 % dil, b, k0 % dil, b, dil)
            lay |= band
        if self.local:
            L = self.local
            lay |= (k1 >= (q0 // L) * L) & (k0 <= (q1 // L) * L + L - 1)
        if self.stride:
            lay |= _circular_overlap(q0 % self.stride, b, k0 % self.stride, b, self.stride)
        if self.summary is not None and self.summary[1] > 0:
            l, c = self.summary
            lay |= _circular_overlap(k0 % l, b, torch.tensor(l - c), c, l).expand(nb, nb)
        if self.global_tokens:
            g = torch.tensor(sorted({t // b for t in self.global_tokens}))
            lay[g, :] = True
            lay[:, g] = True
        if self.blocks is not None:
            lay |= self.blocks
        if self.causal:
            lay &= torch.ones(nb, nb, dtype=torch.bool).tril()
        return lay

    def rule(self, device=None) -> Rule:
        band_lo, band_hi, dil = self.band if self.band is not None else (1, 0, 1)
        sum_l, sum_c = self.summary if self.summary is not None else (1, 0)
        glob = torch.zeros(self.n, dtype=torch.bool)
        if self.global_tokens:
            glob[list(self.global_tokens)] = True
        nb = self.num_blocks
        blocks = self.blocks if self.blocks is not None else torch.zeros(nb, nb, dtype=torch.bool)

        def t(x):
            return torch.tensor(x, device=device)

        return Rule(t(self.causal), t(band_lo), t(band_hi), t(dil), t(self.local > 0),
                    t(max(self.local, 1)), t(self.stride > 0), t(max(self.stride, 1)),
                    t(sum_l), t(sum_c), glob.to(device), t(self.block_size),
                    blocks.to(device=device, dtype=torch.bool).contiguous())


def _blocked_tiles(rule: Rule, qc, kc, real_k) -> torch.Tensor:
    """``(r, b, c*b)`` bool, True where the pair is NOT allowed (pattern or padded key),
    ``_CHUNK / 2`` pairs at a time: :func:`allows` makes int64 temporaries of the tile's
    shape, 8x its bool size (35M pairs for ``sparse_transformer`` at 16K)."""
    r, b = qc.shape
    cb = kc.shape[1]
    out = torch.empty(r, b, cb, dtype=torch.bool)
    step = max(1, (_CHUNK // 2) // (b * cb))
    for r0 in range(0, r, step):
        s = slice(r0, r0 + step)
        ok = allows(rule, qc[s].unsqueeze(-1), kc[s].unsqueeze(1)) & real_k[s].unsqueeze(1)
        out[s] = ok.logical_not_()
    return out


@dataclass
class _Group:
    """Query blocks that need the same number ``c`` of key blocks."""

    rows: torch.Tensor  # (r,) query block indices
    q_tok: torch.Tensor  # (r*b,) query positions, clamped to n-1
    k_tok: torch.Tensor  # (r*c*b,) key positions, clamped to n-1
    blocked: torch.Tensor  # (r, b, c*b) bool: pair NOT allowed (pattern, causal, padding)
    dead: torch.Tensor | None  # (r, b, 1) rows with no allowed key, None if there are none
    c: int


class _Plan:
    """What a pattern needs at one length and device: layout, groups, predicate tiles."""

    def __init__(self, p: SparsePattern, device) -> None:
        b, n = p.block_size, p.n
        self.pattern, self.rule = p, p.rule(device)
        lay = p.block_layout()
        self.layout = lay
        # A query block with no key block still gets one, entirely blocked: its rows give 0
        # through the same softmax, so the output stays connected to the autograd graph.
        counts = lay.sum(1).clamp(min=1)
        # Allowed key blocks first, in ascending order (stable sort of "not allowed").
        self.kidx = torch.argsort((~lay).to(torch.int8), dim=1, stable=True)
        rule_cpu = p.rule()
        ar = torch.arange(b)
        self.groups: list[_Group] = []
        for c in torch.unique(counts).tolist():
            rows = torch.nonzero(counts == c).flatten()
            q_tok = rows.unsqueeze(1) * b + ar  # (r, b)
            k_tok = (self.kidx[rows, :c].unsqueeze(-1) * b + ar).reshape(len(rows), c * b)
            qc, kc = q_tok.clamp(max=n - 1), k_tok.clamp(max=n - 1)
            blocked = _blocked_tiles(rule_cpu, qc, kc, k_tok < n)
            dead = blocked.all(-1, keepdim=True)
            self.groups.append(_Group(rows.to(device), qc.flatten().to(device),
                                      kc.flatten().to(device), blocked.to(device),
                                      dead.to(device) if dead.any() else None, c))
        order = torch.cat([g.rows.cpu() for g in self.groups])
        self.inverse = torch.argsort(order).to(device)  # from group order back to block order
        self._flex = {}

    def block_mask(self, with_full: bool, mask_mod):
        """A FlexAttention ``BlockMask``; its kv tensors are cached, ``mask_mod`` is per call.

        ``with_full`` marks blocks whose every pair is allowed as *full* (FlexAttention then
        skips ``mask_mod`` there); a caller's bool mask needs every block *partial*.
        """
        if with_full not in self._flex:
            lay, dev = self.layout, self.rule.blocks.device
            if with_full:
                b, full = self.pattern.block_size, torch.zeros_like(lay)
                for g in self.groups:
                    rows, no = g.rows.cpu(), g.blocked.cpu()
                    tile_full = ~no.view(len(rows), b, g.c, b).any(3).any(1)  # (r, c)
                    full[rows.unsqueeze(1), self.kidx[rows, : g.c]] = tile_full
                parts = (lay & ~full, full)
            else:
                parts = (lay,)
            tensors = []
            for sel in parts:
                order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)
                tensors += [sel.sum(1).to(torch.int32)[None, None].to(dev),
                            order.to(torch.int32)[None, None].contiguous().to(dev)]
            self._flex[with_full] = tensors
        t = self._flex[with_full]
        return BlockMask.from_kv_blocks(*t, BLOCK_SIZE=self.pattern.block_size,
                                        mask_mod=mask_mod, seq_lengths=(self.pattern.n,) * 2)


def plan_for(p: SparsePattern, device) -> _Plan:
    key = p.cache_key(device)
    plan = _CACHE.get(key)
    if plan is None:
        plan = _Plan(p, device)
        _CACHE[key] = plan
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return plan


def _mask_tile(mask, g: _Group, rows: slice, b: int):
    """The caller's 4-D broadcastable ``attn_mask`` at the chunk's (query, key) pairs."""
    r = rows.stop - rows.start
    cb = g.c * b
    qi = g.q_tok[rows.start * b: rows.stop * b].view(r, b, 1)
    ki = g.k_tok[rows.start * cb: rows.stop * cb].view(r, 1, cb)
    qi = qi if mask.shape[2] > 1 else torch.zeros_like(qi)
    ki = ki if mask.shape[3] > 1 else torch.zeros_like(ki)
    return mask[:, :, qi, ki]  # (mb, mh, r, b, c*b)


def _softmax(s, blocked, dead):
    """Row softmax of ``s`` without the ``blocked`` pairs; rows in ``dead`` give 0.

    ``s`` is a fresh tensor no backward needs, so it is masked in place. A dead row is set
    to 0 before the exponent and zeroed after: no NaN in the output or the gradient.
    """
    s = s.masked_fill_(blocked, float("-inf"))
    if dead is None:
        return torch.softmax(s, dim=-1)
    return torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def _chunks(q, k, v, g: _Group, b: int, grad: bool):
    """``(rows, heads, qs, ks, vs)`` for each chunk of group ``g``: its query blocks
    ``rows`` (a slice of the group) and ``heads`` (a slice), with their queries
    ``(B, h, r, b, D)`` and key/value blocks ``(B, h, r, c*b, D|Dv)``.

    With autograd: one gather per group, then split. The backward of ``split`` is one
    concatenation and that of ``index_select`` one scatter per group (gathering per chunk
    would scatter each chunk's gradient into its own full-length buffer); autograd keeps
    every chunk's blocks anyway. Without it, each chunk gathers its own blocks, never all
    at once (``sparse_transformer`` at 16K gathered 9 GiB), sized by the larger of its
    scores and its gathered elements; a query block that alone exceeds that (a global
    token's sees every key) goes a few heads at a time.
    """
    B, H, _, D = q.shape
    Dv, r_all, cb = v.shape[-1], len(g.rows), g.c * b
    per_col = b if grad else max(b, (D + Dv + 1) // 2)
    if grad:
        per_chunk = max(1, _CHUNK // (B * H * cb * per_col))
        sizes = [min(per_chunk, r_all - r0) for r0 in range(0, r_all, per_chunk)]
        qg = q.index_select(2, g.q_tok).view(B, H, r_all, b, D).split(sizes, dim=2)
        kg = k.index_select(2, g.k_tok).view(B, H, r_all, cb, D).split(sizes, dim=2)
        vg = v.index_select(2, g.k_tok).view(B, H, r_all, cb, Dv).split(sizes, dim=2)
        r0 = 0
        for qs, ks, vs in zip(qg, kg, vg, strict=True):
            yield slice(r0, r0 + qs.shape[2]), slice(None), qs, ks, vs
            r0 += qs.shape[2]
        return
    h = min(H, max(1, _CHUNK // (B * cb * per_col)))
    per_chunk = max(1, _CHUNK // (B * h * cb * per_col))
    for h0 in range(0, H, h):
        heads = slice(h0, h0 + h)
        qh, kh, vh = q[:, heads], k[:, heads], v[:, heads]
        n_h = qh.shape[1]
        for r0 in range(0, r_all, per_chunk):
            r = min(per_chunk, r_all - r0)
            qs = qh.index_select(2, g.q_tok[r0 * b: (r0 + r) * b]).view(B, n_h, r, b, D)
            k_tok = g.k_tok[r0 * cb: (r0 + r) * cb]
            ks = kh.index_select(2, k_tok).view(B, n_h, r, cb, D)
            vs = vh.index_select(2, k_tok).view(B, n_h, r, cb, Dv)
            yield slice(r0, r0 + r), heads, qs, ks, vs


def _attend_chunk(qs, ks, vs, g: _Group, rows: slice, b: int, attn_mask, dropout_p):
    """``softmax(qs ks^T + mask) vs`` over the chunk's allowed pairs: ``(B, h, r, b, Dv)``;
    ``attn_mask`` already cut to the chunk's heads."""
    s = torch.matmul(qs, ks.transpose(-1, -2))  # (B, h, r, b, c*b), scale in q
    blocked, dead = g.blocked[rows], None if g.dead is None else g.dead[rows]
    if attn_mask is not None:
        tile = _mask_tile(attn_mask, g, rows, b)
        if tile.dtype == torch.bool:
            blocked = blocked | ~tile
        else:
            s = s + tile
            blocked = blocked | torch.isneginf(tile)
        dead = blocked.all(-1, keepdim=True)
    w = _softmax(s, blocked, dead)
    if dropout_p > 0:
        w = torch.nn.functional.dropout(w, dropout_p)
    return torch.matmul(w, vs)


def blocked_attention(q, k, v, p: SparsePattern, attn_mask, scale, dropout_p=0.0):
    """Sparse attention by gathering, per query block, only the key blocks it needs."""
    B, H, N, D = q.shape
    Dv, b, dtype = v.shape[-1], p.block_size, q.dtype
    plan = plan_for(p, q.device)
    wdt = work_dtype(dtype)  # half inputs: computed in float32
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, attn_mask))
    q, k, v = q.to(wdt), k.to(wdt), v.to(wdt)
    if grad:
        q = q * scale
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(wdt)
    outs = []
    out = None if grad else q.new_empty(B, H, p.num_blocks, b, Dv)
    for g in plan.groups:
        for rows, heads, qs, ks, vs in _chunks(q, k, v, g, b, grad):
            if not grad:
                qs.mul_(scale)  # a fresh gather: scaled in place
            mask = attn_mask
            if mask is not None and mask.shape[1] > 1:
                mask = mask[:, heads]
            o = _attend_chunk(qs, ks, vs, g, rows, b, mask, dropout_p)
            if grad:
                outs.append(o)
            else:  # each query block lies in exactly one group: every block is written
                out[:, heads].index_copy_(2, g.rows[rows], o)
    if grad:
        out = torch.cat(outs, dim=2).index_select(2, plan.inverse)  # back to block order
    return out.reshape(B, H, -1, Dv)[:, :, :N].to(dtype)
