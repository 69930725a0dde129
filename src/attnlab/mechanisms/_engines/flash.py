"""The FlashAttention engine behind :mod:`attnlab.mechanisms.exact`'s ``flash``.

Queries are cut into blocks ``Q_i`` (``block_q`` rows) and keys/values into blocks
``K_j, V_j`` (``block_k`` rows); each query block streams over the key blocks keeping, per
row, a reference max ``m``, a normaliser ``l`` and an unnormalised output ``acc``:

.. math::

    S_{ij} = \\tau\\, Q_i K_j^\\top + M_{ij}, \\qquad
    P_{ij} = e^{S_{ij} - m}, \\qquad
    l \\leftarrow l + \\mathrm{rowsum}\\, P_{ij}, \\qquad acc \\leftarrow acc + P_{ij} V_j

and at the end ``O_i = acc / l`` and ``L_i = m + log l`` (the row log-sum-exp). Only
``Q, K, V, O`` and ``L`` are kept for backward (``O(N)`` memory), which *recomputes* each
tile ``P_ij = exp(S_ij - L_i)`` (Dao et al. 2022, FlashAttention-2's ordering)::

    D_i   = rowsum(dO_i * O_i)
    dV_j += P_ij^T dO_i          dP_ij = dO_i V_j^T          dS_ij = P_ij * (dP_ij - D_i)
    dQ_i += tau dS_ij K_j        dK_j += tau dS_ij^T Q_i     (dM_ij = dS_ij for a float mask)

**Causal** (top-left aligned, key ``j`` allowed iff ``j <= i``, also for ``Nq != Nk``): a
tile whose every key lies after its every query (``j0 > i1 - 1``) is never computed, in
forward or backward; only a tile crossing the diagonal (``j1 - 1 > i0``) gets the mask, as
one cached additive ``0 / -inf`` tile. Causal work is thus about half the square.

Implementation notes (CPU, plain PyTorch, so every full-tile op counts):

* Scores are in base-2 units (``Q`` pre-multiplied by ``tau * log2(e)``): ``exp2`` is
  several times faster than ``exp`` on CPU; ``m`` and ``L`` are base-2 too.
* A per-row constant is folded into a matrix product as one more column (``[Q, -m]``
  against ``[K, 1]``), at no measurable cost for the ``Q K^T`` shape: forward's
  ``S - m``, backward's ``S - L`` and ``dP - D`` (``[dO, -D]`` against ``[V, 1]``) need no
  pass of their own over the tile.
* Conditional rescaling (as FlashAttention-4): ``m`` is moved only when a row's max
  exceeds it by more than ``TAU`` bits (and on a row's first allowed key), so ``P <= 2^TAU``
  and, on most tiles, neither ``S - m`` nor the rescale ``acc * e^{m - m_new}`` is done.
  ``m`` is always a score the row has seen, so ``P`` never underflows as a whole.
* The backward loops over key blocks outside and query blocks inside: ``dK_j, dV_j``
  accumulate in contiguous buffers (in place, transposed: ``Q_i^T dS_ij`` is faster than
  ``dS_ij^T Q_i`` on CPU), ``dQ_i`` in one contiguous block each; a product into a strided
  view would be cut into one matrix product per head.
* Bool masks become ``1 - 1/allowed`` (``0`` or ``-inf``) and are added: ``masked_fill``
  is several times slower than an add on CPU.
* Dropout multiplies ``P_ij`` by a keep mask drawn from a per-tile generator seeded from
  ``(seed, i, j)``, so backward regenerates the very same mask without storing it; ``l``
  uses the undropped ``P``. Half-precision inputs are computed in float32.
* A row with no allowed key has ``l = 0``: its output is 0 and ``L = +inf``, which makes
  its recomputed ``P`` 0, so its gradients are 0 too (the contract's fully masked rows).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from attnlab.contract import slice_mask, work_dtype

__all__ = ["FlashAttentionFunction", "TAU"]

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
TAU = 8.0  # bits a row's max may outgrow its reference m before m moves (P <= 2^TAU)
_INF = float("inf")
_GOLDEN = 0x9E3779B97F4A7C15  # odd, so distinct tile numbers give distinct seeds


def _tile(buf, *shape):
    """A contiguous view of a reused buffer: fresh multi-MB allocations cost page faults on
    every tile, measurably slowing the loop on CPU."""
    return buf[: math.prod(shape)].view(shape)


def _with_column(x, col):
    """``[x, col]`` along the last dim, ``col`` a ``(BH, N)`` tensor or a number."""
    out = x.new_empty(*x.shape[:-1], x.shape[-1] + 1)
    out[..., :-1] = x
    out[..., -1] = col
    return out


class _Tiles:
    """The tiling of one call: block ranges, which tiles causality removes, masks, dropout."""

    def __init__(self, B, H, Nq, Nk, bq, bk, is_causal, attn_mask, dropout_p, seed, wdt):
        self.B, self.H, self.Nq, self.Nk, self.bq, self.bk = B, H, Nq, Nk, bq, bk
        self.is_causal, self.mask, self.dropout_p, self.seed = is_causal, attn_mask, dropout_p, seed
        self.wdt, self.n_kblocks, self._diag = wdt, -(-Nk // bk), {}

    def query_blocks(self, first_row=0):
        """``(bi, i0, i1)`` of the query blocks from the one holding ``first_row`` on."""
        for bi in range(first_row // self.bq, -(-self.Nq // self.bq)):
            yield bi, bi * self.bq, min((bi + 1) * self.bq, self.Nq)

    def key_blocks(self, i1):
        """``(bj, j0, j1)`` of the key blocks a query block ending at ``i1`` may see: under
        ``is_causal`` keys ``j >= i1`` follow every one of its rows and are skipped."""
        end = min(self.Nk, i1) if self.is_causal else self.Nk
        for bj in range(-(-end // self.bk)):
            yield bj, bj * self.bk, min((bj + 1) * self.bk, self.Nk)

    def query_blocks_for(self, j0):
        """The query blocks that see key block ``j0``: under ``is_causal`` rows ``i < j0``
        see none of it, so the first is the block holding row ``j0``."""
        return self.query_blocks(j0 if self.is_causal else 0)

    def _causal_bias(self, n, m, offset, device):
        """``0 / -inf`` tile blocking key ``j0 + c`` for query ``i0 + r`` iff ``c - r > offset``
        (``offset = i0 - j0``); cached, the diagonal tiles repeat the same few."""
        key = (n, m, offset)
        if key not in self._diag:
            blocked = torch.ones(n, m, dtype=torch.bool, device=device).triu_(offset + 1)
            self._diag[key] = torch.zeros(n, m, dtype=self.wdt, device=device).masked_fill_(
                blocked, -_INF)
        return self._diag[key]

    def mask_tile(self, S, i0, i1, j0, j1):
        """Add tile ``(i0:i1, j0:j1)``'s mask (base 2) to ``S`` ``(BH, n, m)`` in place."""
        n, m = i1 - i0, j1 - j0
        bias = None
        if self.mask is not None:
            tile = slice_mask(self.mask, i0, i1, j0, j1)
            if tile.dtype == torch.bool:  # 1 - 1/allowed: 0 where allowed, -inf where not
                bias = torch.reciprocal(tile.to(self.wdt)).neg_().add_(1.0)
            else:
                bias = tile.to(self.wdt) * LOG2E
        if self.is_causal and j1 - 1 > i0:  # the tile crosses the diagonal
            diag = self._causal_bias(n, m, i0 - j0, S.device)
            bias = diag if bias is None else bias + diag
        if bias is not None:
            S.view(self.B, self.H, n, m).add_(bias)  # masks broadcast against (B, H, n, m)

    def keep(self, shape, bi, bj, device):
        """Dropout's ``keep / (1 - p)`` for tile ``(bi, bj)``, identical in forward and
        backward (the same seed, shape and draw order)."""
        tile_no = bi * self.n_kblocks + bj + 1
        g = torch.Generator(device=device)
        g.manual_seed((self.seed + tile_no * _GOLDEN) % 2**63)
        r = torch.rand(shape, generator=g, device=device, dtype=self.wdt)
        return (r >= self.dropout_p).to(self.wdt).mul_(1.0 / (1.0 - self.dropout_p))


def _forward_rows(tiles, qa_i, ka, v3, bi, i0, i1, buf):
    """``O_i`` and ``L_i`` of query block ``bi``; ``qa_i = [Q_i, -m]`` (last column updated)."""
    BH, n, Dv = qa_i.shape[0], i1 - i0, v3.shape[-1]
    mref = qa_i.new_zeros(BH, n)  # m; 0 for a row that has seen no allowed key yet (l = 0)
    l = torch.zeros_like(mref)
    acc = qa_i.new_zeros(BH, n, Dv)
    qa_i[..., -1] = 0.0
    for bj, j0, j1 in tiles.key_blocks(i1):
        T = torch.bmm(qa_i, ka[:, j0:j1].transpose(1, 2), out=_tile(buf, BH, n, j1 - j0))
        tiles.mask_tile(T, i0, i1, j0, j1)  # T = S - m
        r = T.amax(dim=-1)
        grow = (r > TAU) | ((l == 0) & (r > -_INF))
        if grow.any():  # move m to the new max in these rows only
            shift = torch.where(grow, r, 0.0)
            T.sub_(shift.unsqueeze(-1))
            mref.add_(shift)
            qa_i[..., -1] = -mref
            if (grow & (l > 0)).any():  # rows with a sum so far: rescale it
                alpha = torch.exp2(-shift)
                l.mul_(alpha)
                acc.mul_(alpha.unsqueeze(-1))
        P = T.exp2_()
        l.add_(P.sum(dim=-1))
        if tiles.dropout_p > 0:
            P.mul_(tiles.keep(P.shape, bi, bj, P.device))
        acc.baddbmm_(P, v3[:, j0:j1])
    dead = l == 0  # no key allowed: output 0, and L = +inf makes backward's P = 0
    O_i = acc.div_(l.masked_fill(dead, 1.0).unsqueeze(-1))
    return O_i, torch.where(dead, _INF, mref + torch.log2(l))


def _backward_keys(tiles, g, bj, j0, j1, bufs):
    """``dK_j^T, dV_j^T`` of key block ``bj``; adds its share to every ``dQ_i`` in ``g.dq``."""
    BH, m, D, Dv = g.k3.shape[0], j1 - j0, g.k3.shape[-1], g.v3.shape[-1]
    k_j, ka_j, v_j, va_j = g.k3[:, j0:j1], g.ka[:, j0:j1], g.v3[:, j0:j1], g.va[:, j0:j1]
    dkT_j = _tile(bufs["dk"], BH, D, m).zero_()
    dvT_j = _tile(bufs["dv"], BH, Dv, m).zero_()
    dropout = tiles.dropout_p > 0
    for bi, i0, i1 in tiles.query_blocks_for(j0):
        n = i1 - i0
        qs_i, dO_i = g.qa[:, i0:i1, :D], g.doa[:, i0:i1, :Dv]
        # P = exp2(S - L): [Q, -L] . [K, 1]; a dead row has L = +inf, so P = 0.
        P = torch.bmm(g.qa[:, i0:i1], ka_j.transpose(1, 2), out=_tile(bufs["S"], BH, n, m))
        tiles.mask_tile(P, i0, i1, j0, j1)
        P.exp2_()
        if dropout:
            Z = tiles.keep(P.shape, bi, bj, P.device)
            dP = torch.bmm(dO_i, v_j.transpose(1, 2), out=_tile(bufs["dP"], BH, n, m))
            dvT_j.baddbmm_(dO_i.transpose(1, 2), P * Z)
            dP.mul_(Z).add_(g.doa[:, i0:i1, Dv:])  # Z dP - D: dO flows through kept weights
        else:  # dP - D = [dO, -D] . [V, 1]
            dP = torch.bmm(g.doa[:, i0:i1], va_j.transpose(1, 2), out=_tile(bufs["dP"], BH, n, m))
            dvT_j.baddbmm_(dO_i.transpose(1, 2), P)
        dS = dP.mul_(P)  # softmax backward
        g.dq[bi].baddbmm_(dS, k_j)
        dkT_j.baddbmm_(qs_i.transpose(1, 2), dS)
        if g.dmask is not None:  # the mask is added to S, so dM = dS summed over broadcasts
            tile = slice_mask(g.dmask, i0, i1, j0, j1)
            tile.add_(dS.view(tiles.B, tiles.H, n, m).sum_to_size(tile.shape))
    return dkT_j, dvT_j


class _Grads:
    """The backward pass's operands (float32 or wider, ``(BH, N, *)``) and accumulators."""


class FlashAttentionFunction(torch.autograd.Function):
    """``apply(q, k, v, attn_mask, is_causal, scale, dropout_p, block_q, block_k)``."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, dropout_p, block_q, block_k):
        B, H, Nq, D = q.shape
        Nk, Dv = k.shape[2], v.shape[3]
        wdt = work_dtype(q.dtype)
        # Base seed from the global RNG: torch.manual_seed makes dropout reproducible.
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
        tiles = _Tiles(B, H, Nq, Nk, block_q, block_k, is_causal, attn_mask, dropout_p, seed,
                       wdt)
        qa = _with_column(q.reshape(B * H, Nq, D).to(wdt) * (scale * LOG2E), 0.0)
        ka = _with_column(k.reshape(B * H, Nk, D).to(wdt), 1.0)
        v3 = v.reshape(B * H, Nk, Dv).to(wdt)
        O = torch.empty(B * H, Nq, Dv, dtype=wdt, device=q.device)
        L = torch.empty(B * H, Nq, dtype=wdt, device=q.device)
        buf = torch.empty(B * H * block_q * block_k, dtype=wdt, device=q.device)
        for bi, i0, i1 in tiles.query_blocks():
            O[:, i0:i1], L[:, i0:i1] = _forward_rows(tiles, qa[:, i0:i1], ka, v3, bi, i0, i1,
                                                     buf)
        out = O.view(B, H, Nq, Dv).to(q.dtype)
        ctx.tiles, ctx.scale = tiles, scale
        # O kept in the work dtype: D_i = rowsum(dO_i * O_i) from a float16-rounded O made
        # dq 2.6x SDPA's error (the flash rule's bound is 2x); O(N Dv) floats more.
        ctx.save_for_backward(q, k, v, O.view(B, H, Nq, Dv), L, attn_mask)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, L, attn_mask = ctx.saved_tensors
        tiles, scale = ctx.tiles, ctx.scale
        B, H, Nq, D = q.shape
        Nk, Dv, wdt, BH = k.shape[2], v.shape[3], tiles.wdt, B * H
        g = _Grads()
        g.qa = _with_column(q.reshape(BH, Nq, D).to(wdt) * (scale * LOG2E), -L)
        g.k3 = k.reshape(BH, Nk, D).to(wdt)
        g.ka, g.v3 = _with_column(g.k3, 1.0), v.reshape(BH, Nk, Dv).to(wdt)
        g.va = _with_column(g.v3, 1.0)
        dO = dout.reshape(BH, Nq, Dv).to(wdt)
        g.doa = _with_column(dO, -(dO * out.reshape(BH, Nq, Dv).to(wdt)).sum(-1))  # [dO, -D]
        g.dq = [q.new_zeros(BH, i1 - i0, D, dtype=wdt) for _, i0, i1 in tiles.query_blocks()]
        want_dmask = ctx.needs_input_grad[3]
        g.dmask = torch.zeros(attn_mask.shape, dtype=wdt, device=q.device) if want_dmask else None
        dk = torch.zeros(BH, Nk, D, dtype=wdt, device=q.device)
        dv = torch.zeros(BH, Nk, Dv, dtype=wdt, device=q.device)
        size = BH * tiles.bq * tiles.bk
        bufs = {"S": q.new_empty(size, dtype=wdt), "dP": q.new_empty(size, dtype=wdt),
                "dk": q.new_empty(BH * D * tiles.bk, dtype=wdt),
                "dv": q.new_empty(BH * Dv * tiles.bk, dtype=wdt)}
        for bj, j0, j1 in tiles.key_blocks(Nq if tiles.is_causal else Nk):
            dkT_j, dvT_j = _backward_keys(tiles, g, bj, j0, j1, bufs)
            dk[:, j0:j1] = dkT_j.transpose(1, 2)
            dv[:, j0:j1] = dvT_j.transpose(1, 2)
        # Scale factors left out of the loop: S = scale q k^T, and qa carries scale*log2(e).
        dq = torch.cat(g.dq, dim=1).mul_(scale).view(B, H, Nq, D)
        dk = dk.mul_(LN2).view(B, H, Nk, D)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.view(B, H, Nk, Dv).to(v.dtype),
                None if g.dmask is None else g.dmask.to(attn_mask.dtype),
                None, None, None, None, None)
