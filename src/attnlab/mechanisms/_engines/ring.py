"""The ring-attention engine behind :mod:`attnlab.mechanisms.ring` (Liu et al. 2023).

Context parallelism: each of the ``P`` ranks of a ``torch.distributed`` process group holds
its shard of ``Q, K, V`` along the sequence, ``n = N / P`` tokens. The key/value shards
travel around the ring (rank ``r`` sends to ``r + 1`` and receives from ``r - 1``): at step
``s`` rank ``r`` holds the shard of ``src = (r - s) mod P`` and folds it into the running
online-softmax state of its own queries (``m`` the running max, ``l`` the normaliser,
``acc`` the unnormalised output; blockwise, ``block_size`` rows a tile), while the next
shard is already in flight (``batch_isend_irecv`` posted before the compute, waited on
after it). After ``P`` steps ``O = acc / l`` and ``L = m + log l``.

Backward (:class:`RingAttentionFunction`) recomputes each tile from ``L`` (no ``(N, N)``
tensor is ever kept) and passes the key/value shards around the ring again, now with their
``dK, dV`` accumulators: at step ``s`` rank ``r`` adds its queries' share to the accumulator
of shard ``src`` and sends it on; after ``P`` steps every accumulator is back on its owner.
A rank's contribution is computed into a fresh buffer, so the accumulator's own transfer
overlaps that compute too. No rank ever gathers the sequence: it holds at most two
key/value shards (the one in hand, the one arriving) and, in backward, their accumulators.

Layouts of the sequence over ranks (:func:`positions`; ``c = N / 2P`` for zigzag):

* ``contiguous``: rank ``r`` holds tokens ``[r n, (r + 1) n)``; under causal masking rank
  ``r`` scores ``r + 1/2`` shards' worth of pairs: the last rank does ``2P - 1`` times the
  first rank's work.
* ``zigzag``: ``2P`` chunks, rank ``r`` holds chunks ``r`` and ``2P - 1 - r`` (as
  ring-flash-attention and Llama 3's context parallelism): equal causal work per rank.
* ``striped`` (Brandon et al. 2023): token ``t`` on rank ``t mod P``; every pair of shards
  is a near-triangle: equal causal work per rank (its diagonal tiles are masked, not
  skipped: with small tiles it skips fewer than zigzag does).

Causal masking uses the tokens' *global* positions: key ``t'`` is allowed for query ``t``
iff ``t' <= t``. A tile whose every key follows its every query is skipped, not computed
(counted in :class:`RingStats`), a tile with every key before its every query gets no mask.

``N`` must be a multiple of the layout's unit, ``2P`` for zigzag and ``P`` otherwise (each
rank the same ``n``): :func:`shard` and the engine raise a ``ValueError`` naming it. To
attend a length that is not, pad it to a multiple and mask the padding with a key-padding
mask (padding at the end of the sequence: causal queries never see it, and padded rows are
dropped). With ``P = 1`` (no group) every layout is the identity and any ``N`` is taken.

A key-padding keep mask ``(B, H, n)`` travels with the keys as one more column of the
payload (``0`` or ``-inf`` added to the scores). Half-precision inputs are computed in
float32; the accumulators travel in the compute dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from attnlab.contract import work_dtype

__all__ = ["LAYOUTS", "RingAttentionFunction", "RingStats", "check_length", "layout_unit",
           "positions", "shard", "unshard"]

LAYOUTS = ("zigzag", "striped", "contiguous")
_INF = float("inf")
_KV, _GRAD = 0, 1  # message tags: the key/value shard and its gradient accumulator


# ------------------------------------------------------------------------ layouts
def layout_unit(layout: str, P: int) -> int:
    """What ``N`` must be a multiple of: ``2P`` chunks for zigzag, ``P`` otherwise."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}; got {layout!r}")
    return 2 * P if layout == "zigzag" else P


def check_length(N: int, layout: str, P: int, who: str = "ring") -> None:
    """A ``ValueError`` naming the divisor unless ``N`` cuts evenly into ``layout``."""
    unit = layout_unit(layout, P)
    if P > 1 and N % unit:
        what = f"2P = {unit} equal chunks" if layout == "zigzag" else f"P = {unit} equal shards"
        raise ValueError(f"{who}: layout {layout!r} cuts the sequence into {what}; N = {N} "
                         f"is not a multiple of {unit} (pad it to {N + (-N) % unit} and mask "
                         f"the padding with a key-padding mask)")


def positions(layout: str, rank: int, P: int, n: int, device=None) -> torch.Tensor:
    """Global positions (int64, increasing) of the ``n`` tokens rank ``rank`` holds."""
    check_length(n * P, layout, P)
    i = torch.arange(n, device=device)
    if P == 1:
        return i
    if layout == "contiguous":
        return rank * n + i
    if layout == "striped":
        return rank + P * i
    c = n // 2  # zigzag: chunks rank and 2P - 1 - rank
    return torch.cat([rank * c + i[:c], (2 * P - 1 - rank) * c + i[:c]])


def _segments(layout: str, P: int, n: int) -> list[tuple[int, int]]:
    """Local index ranges whose positions are one arithmetic run (tiles stay inside one)."""
    return [(0, n // 2), (n // 2, n)] if layout == "zigzag" and P > 1 else [(0, n)]


def shard(x: torch.Tensor, layout: str, rank: int, P: int) -> torch.Tensor:
    """Rank ``rank``'s shard of ``x`` ``(..., N, D)`` (the sequence on dim -2), a copy."""
    N = x.shape[-2]
    check_length(N, layout, P, who="shard")
    return x.index_select(-2, positions(layout, rank, P, N // P, x.device))


def unshard(parts, layout: str) -> torch.Tensor:
    """The full ``(..., N, D)`` tensor from every rank's shard, ``parts[r]`` rank ``r``'s."""
    P, n = len(parts), parts[0].shape[-2]
    out = parts[0].new_empty(*parts[0].shape[:-2], n * P, parts[0].shape[-1])
    for r, part in enumerate(parts):
        out.index_copy_(-2, positions(layout, r, P, n, part.device), part)
    return out


# ------------------------------------------------------------------ instrumentation
@dataclass
class RingStats:
    """What the engine did, accumulated over calls (``reset()`` to start again).

    ``comm_wait_s``: seconds spent waiting for a transfer to finish (what the overlap did
    not hide); ``compute_s``: seconds in the tile loops. On CUDA both are host times unless
    ``synchronize`` (then every timer first waits for the device).
    """

    tiles_computed: int = 0
    tiles_skipped: int = 0
    steps: int = 0
    comm_wait_s: float = 0.0
    compute_s: float = 0.0
    bytes_sent: int = 0
    synchronize: bool = False

    def reset(self) -> None:
        self.tiles_computed = self.tiles_skipped = self.steps = self.bytes_sent = 0
        self.comm_wait_s = self.compute_s = 0.0

    def clock(self, device) -> float:
        if self.synchronize and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()


class _Ring:
    """Rank, size and neighbours of a group; posts and waits on the ring's transfers."""

    def __init__(self, group, stats: RingStats):
        self.group, self.stats = group, stats
        self.P = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        if self.P > 1:
            self.next = dist.get_global_rank(group, (self.rank + 1) % self.P)
            self.prev = dist.get_global_rank(group, (self.rank - 1) % self.P)

    def pass_on(self, t: torch.Tensor, tag: int):
        """Send ``t`` to the next rank and receive the previous rank's into a new buffer;
        returns ``(requests, buffer)`` for :meth:`wait`."""
        buf = torch.empty_like(t)
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag),
               dist.P2POp(dist.irecv, buf, self.prev, self.group, tag)]
        self.stats.bytes_sent += t.numel() * t.element_size()
        return dist.batch_isend_irecv(ops), buf

    def wait(self, pending) -> torch.Tensor:
        reqs, buf = pending
        start = self.stats.clock(buf.device)
        for r in reqs:
            r.wait()
        self.stats.comm_wait_s += self.stats.clock(buf.device) - start
        return buf


# ------------------------------------------------------------------------ tiling
class _Plan:
    """The tiles of this rank's queries against one shard: skipped, full or masked."""

    def __init__(self, layout, P, n, block, is_causal, device, dtype, slopes=None):
        self.layout, self.P, self.n, self.is_causal = layout, P, n, is_causal
        self.device, self.dtype = device, dtype
        self.slopes = slopes  # ALiBi's m_h per (batch, head) row of the tiles, or None
        self.blocks = [(a, min(a + block, e)) for s, e in _segments(layout, P, n)
                       for a in range(s, e, block)]

    def tiles(self, rank, src, stats):
        """``(i0, i1, j0, j1, bias)`` of every tile to compute against shard ``src``;
        ``bias`` the ``(n_i, m_j)`` causal ``0 / -inf`` tile or ``None`` (all allowed),
        ``(BH, n_i, m_j)`` with ALiBi's ``-m_h (i - j)`` (``-m_h |i - j|`` non-causal) at
        the tokens' global positions added."""
        pq = positions(self.layout, rank, self.P, self.n, self.device)
        pk = positions(self.layout, src, self.P, self.n, self.device)
        lq, lk = pq.tolist(), pk.tolist()
        for i0, i1 in self.blocks:
            for j0, j1 in self.blocks:
                if self.is_causal and lk[j0] > lq[i1 - 1]:  # every key after every query
                    stats.tiles_skipped += 1
                    continue
                stats.tiles_computed += 1
                bias = None
                if self.is_causal and lk[j1 - 1] > lq[i0]:  # the tile crosses the diagonal
                    allowed = pk[None, j0:j1] <= pq[i0:i1, None]
                    bias = torch.zeros(allowed.shape, dtype=self.dtype,
                                       device=self.device).masked_fill_(~allowed, -_INF)
                if self.slopes is not None:
                    bias = self._alibi(pq[i0:i1], pk[j0:j1], bias)
                yield i0, i1, j0, j1, bias

    def _alibi(self, pq, pk, bias):
        """ALiBi's bias on a tile, ``-m_h`` times the distance of global positions."""
        d = (pq[:, None] - pk[None, :]).to(self.dtype)
        d = d if self.is_causal else d.abs()  # the future is -inf (or skipped) anyway
        out = -self.slopes[:, None, None] * d
        return out if bias is None else out + bias


def _scores(q3, kv, D, i0, i1, j0, j1, bias, padded):
    """``S = tau Q_i K_j^T`` (``q3`` pre-scaled) plus the key padding and causal biases."""
    S = torch.bmm(q3[:, i0:i1], kv[:, j0:j1, :D].transpose(1, 2))
    if padded:
        S += kv[:, None, j0:j1, -1]
    if bias is not None:
        S += bias
    return S


def _forward_shard(q3, kv, state, plan, rank, src, stats, D, padded):
    """Fold shard ``src`` (``kv``) into the online-softmax ``state = (m, l, acc)``."""
    m, l, acc = state
    Dv = acc.shape[-1]
    for i0, i1, j0, j1, bias in plan.tiles(rank, src, stats):
        S = _scores(q3, kv, D, i0, i1, j0, j1, bias, padded)
        m_new = torch.maximum(m[:, i0:i1], S.amax(dim=-1))
        m_ref = torch.where(torch.isneginf(m_new), 0.0, m_new)  # no allowed key yet: P = 0
        alpha = torch.exp(m[:, i0:i1] - m_ref)
        P = torch.exp(S - m_ref.unsqueeze(-1))
        l[:, i0:i1] = alpha * l[:, i0:i1] + P.sum(dim=-1)
        acc[:, i0:i1] = alpha.unsqueeze(-1) * acc[:, i0:i1] + torch.bmm(P, kv[:, j0:j1, D:D + Dv])
        m[:, i0:i1] = m_new


def _backward_shard(g, kv, grad, plan, rank, src, stats):
    """Add this rank's queries' share of shard ``src``'s ``[dK, dV]`` to ``grad`` and of
    ``dQ`` to ``g.dq`` (each tile recomputed: ``P = exp(S - L)``)."""
    D, Dv = g.D, g.Dv
    for i0, i1, j0, j1, bias in plan.tiles(rank, src, stats):
        S = _scores(g.q3, kv, D, i0, i1, j0, j1, bias, g.padded)
        P = torch.exp(S - g.L[:, i0:i1, None])  # a dead row has L = +inf: P = 0
        dO = g.dO[:, i0:i1]
        grad[:, j0:j1, D:] += torch.bmm(P.transpose(1, 2), dO)
        dP = torch.bmm(dO, kv[:, j0:j1, D:D + Dv].transpose(1, 2))
        dS = P * (dP - g.delta[:, i0:i1, None])
        g.dq[:, i0:i1] += torch.bmm(dS, kv[:, j0:j1, :D])
        grad[:, j0:j1, :D] += torch.bmm(dS.transpose(1, 2), g.q3[:, i0:i1])


def _payload(k, v, keep, wdt):
    """``[K, V, key bias]`` ``(BH, n, D + Dv (+1))``: what travels around the ring."""
    B, H, n, D = k.shape
    parts = [k.reshape(B * H, n, D).to(wdt), v.reshape(B * H, n, v.shape[-1]).to(wdt)]
    if keep is not None:
        bias = torch.zeros(B * H, n, 1, dtype=wdt, device=k.device)
        parts.append(bias.masked_fill_(~keep.reshape(B * H, n, 1), -_INF))
    return torch.cat(parts, dim=-1).contiguous()


def _per_row(slopes, B: int, wdt):
    """ALiBi's ``(H,)`` slopes for the ``(B H)`` rows the tiles are batched over."""
    return None if slopes is None else slopes.to(wdt).repeat(B)


class _Grads:
    """The backward pass's operands: pre-scaled ``q3``, ``dO``, ``delta``, ``L``, ``dq``."""


class RingAttentionFunction(torch.autograd.Function):
    """``apply(q, k, v, keep, is_causal, scale, layout, block_size, group, stats, slopes)``
    on this rank's shards; ``keep`` a bool ``(B, H, n)`` key-padding mask or ``None``;
    ``slopes`` ALiBi's ``(H,)`` ``m_h`` or ``None``."""

    @staticmethod
    def forward(ctx, q, k, v, keep, is_causal, scale, layout, block_size, group, stats,
                slopes=None):
        ring = _Ring(group, stats)
        B, H, n, D = q.shape
        Dv, wdt = v.shape[-1], work_dtype(q.dtype)
        check_length(n * ring.P, layout, ring.P)
        plan = _Plan(layout, ring.P, n, block_size, is_causal, q.device, wdt,
                     _per_row(slopes, B, wdt))
        q3 = q.reshape(B * H, n, D).to(wdt) * scale
        kv = _payload(k, v, keep, wdt)
        m = torch.full((B * H, n), -_INF, dtype=wdt, device=q.device)
        state = (m, torch.zeros_like(m), q3.new_zeros(B * H, n, Dv))
        for step in range(ring.P):
            pending = ring.pass_on(kv, _KV) if step < ring.P - 1 else None
            start = stats.clock(q.device)
            _forward_shard(q3, kv, state, plan, ring.rank, (ring.rank - step) % ring.P, stats,
                           D, keep is not None)
            stats.compute_s += stats.clock(q.device) - start
            stats.steps += 1
            if pending is not None:
                kv = ring.wait(pending)
        m, l, acc = state
        dead = l == 0  # no key allowed: output 0, and L = +inf makes backward's P = 0
        out = (acc / l.masked_fill(dead, 1.0).unsqueeze(-1)).view(B, H, n, Dv).to(q.dtype)
        L = torch.where(dead, _INF, m + torch.log(l))
        ctx.meta = (is_causal, scale, layout, block_size, group, stats, slopes)
        ctx.save_for_backward(q, k, v, keep, out, L)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, keep, out, L = ctx.saved_tensors
        is_causal, scale, layout, block_size, group, stats, slopes = ctx.meta
        ring = _Ring(group, stats)
        B, H, n, D = q.shape
        Dv, wdt, BH = v.shape[-1], L.dtype, B * H
        g = _Grads()
        g.D, g.Dv, g.L, g.padded = D, Dv, L, keep is not None
        g.q3 = q.reshape(BH, n, D).to(wdt) * scale
        g.dO = dout.reshape(BH, n, Dv).to(wdt)
        g.delta = (g.dO * out.reshape(BH, n, Dv).to(wdt)).sum(-1)  # D_i = rowsum(dO * O)
        g.dq = torch.zeros_like(g.q3)
        plan = _Plan(layout, ring.P, n, block_size, is_causal, q.device, wdt,
                     _per_row(slopes, B, wdt))
        kv = _payload(k, v, keep, wdt)
        grad_pending = grad = None
        for step in range(ring.P):
            kv_pending = ring.pass_on(kv, _KV) if step < ring.P - 1 else None
            mine = q.new_zeros(BH, n, D + Dv, dtype=wdt)
            start = stats.clock(q.device)
            _backward_shard(g, kv, mine, plan, ring.rank, (ring.rank - step) % ring.P, stats)
            stats.compute_s += stats.clock(q.device) - start
            stats.steps += 1
            grad = mine if grad_pending is None else ring.wait(grad_pending).add_(mine)
            if ring.P > 1:  # on to the next rank; after P steps it is back on its owner
                grad_pending = ring.pass_on(grad, _GRAD)
            if kv_pending is not None:
                kv = ring.wait(kv_pending)
        if grad_pending is not None:
            grad = ring.wait(grad_pending)
        dq = (g.dq * scale).view(B, H, n, D).to(q.dtype)  # S = scale q k^T: q3 held it
        dk = grad[..., :D].reshape(B, H, n, D).to(k.dtype)
        dv = grad[..., D:].reshape(B, H, n, Dv).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None, None, None, None
