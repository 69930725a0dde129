"""Attention with a memory beside the context: learned persistent slots, or a kNN store.

**persistent_memory** (Sukhbaatar et al. 2019, the all-attention layer): each head has
``N_m`` learned key/value vectors ``M_k, M_v`` concatenated to the keys and values of every
call, one softmax over both::

    a_t = softmax(scale * q_t [K; M_k]^T),   out_t = a_t [V; M_v]

The slots are unconditioned (they do not depend on the input): a query attends them
whatever the mask or ``is_causal`` says of the context keys, so the caller's mask is
extended with allowed columns. One exception keeps the contract: a query row the caller
masks entirely (no context key at all: padding queries) is a dead row and gives zeros,
slots included. Initialisation as the authors' code: ``M_k ~ N(0, 1/d)`` and
``M_v ~ N(0, 1/N_m)``, used multiplied by ``sqrt(d)`` and ``sqrt(N_m)`` (unit-normal
vectors at the start, with the learning rate of each set scaled to its size). With
``num_slots = 0`` it is softmax attention.

**knn_memory** (Wu et al. 2022, Memorizing Transformers): a bounded store of past
``(key, value)`` pairs per batch row and head. Each call

1. retrieves, per query, the ``topk`` stored entries of largest ``q . k`` (exact search:
   ``torch.topk`` over the store, ``chunk_size`` queries at a time; or ``backend="faiss"``,
   an exact inner-product index, ``faiss.IndexFlatIP``) and attends them,
   ``mem_t = softmax_top-k(scale * q_t . k_m) v_m``;
2. attends the current keys, ``local_t = softmax(scale * q_t K^T + M) V`` (causal with
   ``is_causal``; stored entries are all in the past, so every query sees its retrieved set);
3. mixes them with a learned gate per head, ``out = g mem + (1 - g) local``, ``g =
   sigmoid(b_g)`` (the paper's eq.; ``b_g = 0`` at the start);
4. writes the call's keys and values, detached, to the store, only with ``write=True`` (or
   through :meth:`KNNMemoryAttention.remember`): a call with ``write=False``, the default,
   changes nothing, so the correctness gate's one call is deterministic.

The store keeps the ``memory_size`` newest entries per row (first in, first out).
Keys the caller's mask lets no query attend (padding) are never retrieved: they hold a
place as invalid entries (the store is one tensor for all rows) and are evicted before any
real one. Search is exact, both backends (the paper's approximate kNN index is a faster
way to the same set). **An empty store** (or a query none of whose retrieved entries is
valid) gives the local attention alone, ``out = local``. A dead query row (no allowed
current key) gives zeros, as the contract's. The store belongs to a batch of documents:
a call whose batch size, heads or head sizes differ from the stored entries' raises
``ValueError``; :meth:`reset_memory` empties it (at a document boundary, as the paper
clears its memory). The store is state, not a parameter: it moves with ``.to()`` and is
left out of ``state_dict``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.contract import masked_softmax, merge_masks, work_dtype
from attnlab.mechanisms.base import Mechanism
from attnlab.mechanisms.exact import softmax_attention
from attnlab.registry import REQUIRED, HParam, Limit, Paper, register_mechanism
from attnlab.verify import causal_allowed, param_f64

__all__ = ["KNNMemoryAttention", "PersistentMemoryAttention", "persistent_reference"]

SUKHBAATAR_2019B = Paper(
    "Augmenting Self-attention with Persistent Memory",
    "Sainbayar Sukhbaatar, Edouard Grave, Guillaume Lample, Herve Jegou, Armand Joulin",
    2019,
    "https://arxiv.org/abs/1907.01470",
)
WU_2022 = Paper(
    "Memorizing Transformers",
    "Yuhuai Wu, Markus N. Rabe, DeLesley Hutchins, Christian Szegedy",
    2022,
    "https://arxiv.org/abs/2203.08913",
)

_FLAGS = dict(family="memory", exact=False, causal=True, arbitrary_mask=True, cross=True,
              half_precision=True, learnable=True, kv_cache=False)
_HEADS = HParam("num_heads", int, REQUIRED, "heads H (each has its own slots / gate)", low=1)


def _dead_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(.., Nq|1, 1)`` bool, True where the mask allows no key of the row (None: none)."""
    if mask is None:
        return None
    allowed = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    return ~allowed.any(-1, keepdim=True)


def _check_heads(name: str, q: torch.Tensor, num_heads: int) -> None:
    if q.shape[1] != num_heads:
        raise ValueError(f"{name}: num_heads={num_heads} (one set per head) does not match the "
                         f"H={q.shape[1]} heads of q; build it with num_heads={q.shape[1]}")


# ---------------------------------------------------------------- persistent memory
def persistent_reference(q, k, v, *, mech, scale, is_causal, attn_mask=None):
    """softmax over ``[K; M_k]`` in float64, written plainly (dead rows give zeros)."""
    q, k, v = q.double(), k.double(), v.double()
    M_k, M_v = (param_f64(t) for t in mech.slots())                    # (H, N_m, d)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    allowed = torch.ones(B, H, nq, nk, dtype=torch.bool)
    bias = torch.zeros(B, H, nq, nk, dtype=torch.float64)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    elif attn_mask is not None:
        bias, allowed = bias + attn_mask.double(), allowed & ~torch.isneginf(attn_mask)
    if is_causal:
        allowed = allowed & causal_allowed(nq, nk)
    live = allowed.any(-1, keepdim=True)                               # not a dead row
    s = torch.cat([q @ k.transpose(-2, -1) * scale + bias, q @ M_k.transpose(-2, -1) * scale],
                  dim=-1)
    ok = torch.cat([allowed, live.expand(B, H, nq, M_k.shape[1])], dim=-1)
    s = s.masked_fill(~ok, -math.inf)
    top = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(top), top, 0.0))
    z = e.sum(-1, keepdim=True)
    p = torch.where(z > 0, e / torch.where(z > 0, z, 1.0), 0.0)
    return p @ torch.cat([v, M_v.expand(B, H, *M_v.shape[1:])], dim=-2)


@register_mechanism(
    "persistent_memory",
    paper=SUKHBAATAR_2019B,
    time="O(Nq (Nk + N_m) D)",
    memory="O(N^2 + N N_m)",
    equation="softmax(scale * q [K; M_k]^T + [M, 0]) [V; M_v],  M_k, M_v: N_m learned "
             "slots per head",
    aliases=("all_attention", "persistent_vectors"),
    returns_weights=True,
    hparams=[
        HParam("head_dim", int, REQUIRED, "size d of each key/value head (and slot)", low=1),
        _HEADS,
        HParam("num_slots", int, 64, "N_m persistent key/value vectors per head", low=0),
    ],
    tiny_hparams={"num_slots": 3},
    limit=Limit(hparams=lambda n: {"num_slots": 0},
                note="num_slots = 0: no slot, softmax attention"),
    **_FLAGS,
)
class PersistentMemoryAttention(Mechanism):
    """All-attention: ``N_m`` learned key/value slots per head joined to every call's keys.

    ``softmax(scale * q [K; M_k]^T) [V; M_v]`` (Sukhbaatar et al. 2019, sec. 4); the slots
    are attendable by every live query, under any mask and causally. ``need_weights``
    returns the weights of the ``Nk`` context keys (a row sums to ``1 -`` the slots' share).
    :meth:`slots` gives the effective ``(M_k, M_v)``.
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        H, d, n = self.hp["num_heads"], self.hp["head_dim"], self.hp["num_slots"]
        self.M_k = nn.Parameter(torch.randn(H, n, d) / math.sqrt(d))
        self.M_v = nn.Parameter(torch.randn(H, n, d) / math.sqrt(max(n, 1)))

    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective slots ``(sqrt(d) M_k, sqrt(N_m) M_v)``, each ``(H, N_m, d)``."""
        d, n = self.hp["head_dim"], self.hp["num_slots"]
        return self.M_k * math.sqrt(d), self.M_v * math.sqrt(max(n, 1))

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        _check_heads("persistent_memory", q, self.hp["num_heads"])
        d = self.hp["head_dim"]
        if q.shape[-1] != d or v.shape[-1] != d:
            raise ValueError(f"persistent_memory: q and v head dims must equal head_dim={d} "
                             f"(the slots' size); got D={q.shape[-1]}, Dv={v.shape[-1]}")
        nq, nk = q.shape[2], k.shape[2]
        dtype, work = q.dtype, work_dtype(q.dtype)
        M_k, M_v = (t.to(work) for t in self.slots())
        q, k, v = q.to(work) * scale, k.to(work), v.to(work)
        scores = torch.cat([q @ k.transpose(-2, -1), q @ M_k.transpose(-2, -1)], dim=-1)
        mask = merge_masks(attn_mask, is_causal, nq, nk, q.device)
        p = masked_softmax(scores, self._extended(mask, nk))
        p_used = F.dropout(p, dropout_p) if dropout_p > 0 else p
        out = p_used[..., :nk] @ v + p_used[..., nk:] @ M_v
        return out.to(dtype), (p[..., :nk].to(dtype) if need_weights else None)

    def _extended(self, mask, nk):
        """The caller's mask with ``N_m`` slot columns, allowed on every live row."""
        if mask is None:
            return None
        lead, dead = mask.shape[:-1], _dead_rows(mask)                  # dead: (.., Nq|1, 1)
        if mask.dtype == torch.bool:
            slots = ~dead
        else:
            slots = torch.zeros_like(dead, dtype=mask.dtype).masked_fill(dead, float("-inf"))
        return torch.cat([mask.expand(*lead, nk), slots.expand(*lead, self.hp["num_slots"])],
                         dim=-1)


# ---------------------------------------------------------------- kNN memory
@register_mechanism(
    "knn_memory",
    paper=WU_2022,
    time="O(Nq (Nk + M) D), M = stored entries",
    memory="O(N^2 + chunk M + N topk Dv + M (D + Dv))",
    equation="out = g softmax_{top-k m}(scale q . k_m) v_m + (1 - g) softmax(scale q K^T + M) V,"
             "  g = sigmoid(b_g)",
    aliases=("memorizing_transformer", "knn_augmented"),
    returns_weights=False,
    hparams=[
        _HEADS,
        HParam("memory_size", int, 4096, "entries kept per batch row and head (FIFO)", low=1),
        HParam("topk", int, 32, "entries retrieved per query", low=1),
        HParam("chunk_size", int, 256, "queries per retrieval step (bounds chunk x M "
               "scores)", low=1),
        HParam("write", bool, False, "append every call's keys/values (detached) to the "
               "store after attending"),
        HParam("backend", str, "torch", "exact search: torch.topk, or faiss IndexFlatIP",
               choices=("torch", "faiss")),
    ],
    tiny_hparams={"memory_size": 8, "topk": 3, "chunk_size": 5},
    limit=Limit(hparams=lambda n: {}, note="empty store (a fresh module): its local "
                "attention, softmax attention"),
    **_FLAGS,
)
class KNNMemoryAttention(Mechanism):
    """Memorizing Transformers' kNN-augmented attention: gate(top-k memory, local context).

    The store (buffers ``mem_k``, ``mem_v``: ``(B, H, M, D)``; ``mem_valid`` ``(B, H, M)``)
    fills through ``write=True`` calls or :meth:`remember`; :meth:`reset_memory` empties it.
    """

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.b_g = nn.Parameter(torch.zeros(self.hp["num_heads"]))
        for name in ("mem_k", "mem_v", "mem_valid"):
            self.register_buffer(name, None, persistent=False)

    @property
    def stored(self) -> int:
        """Entries per row in the store (some may be invalid padding from a ragged write)."""
        return 0 if self.mem_k is None else self.mem_k.shape[2]

    def reset_memory(self) -> None:
        """Forget every stored entry (a new batch of documents)."""
        self.mem_k = self.mem_v = self.mem_valid = None

    @torch.no_grad()
    def remember(self, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None):
        """Append ``k`` ``(B, H, N, D)``, ``v`` ``(B, H, N, Dv)`` (detached) to the store;
        ``keep`` ``(B|1, H|1, N)`` bool leaves out the False ones. Keeps the
        ``memory_size`` newest entries of each row."""
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)) or k.dim() != 4 \
                or v.shape[:3] != k.shape[:3]:
            raise ValueError(f"knn_memory: remember needs k (B, H, N, D) and v (B, H, N, Dv) "
                             f"of the same B, H, N; got {getattr(k, 'shape', k)} and "
                             f"{getattr(v, 'shape', v)}")
        self._check_store(k, v)
        B, H, n = k.shape[:3]
        keep = torch.ones(B, H, n, dtype=torch.bool, device=k.device) if keep is None \
            else keep.to(torch.bool).expand(B, H, n)
        if self.mem_k is not None:
            k = torch.cat([self.mem_k, k.to(self.mem_k)], 2)
            v = torch.cat([self.mem_v, v.to(self.mem_v)], 2)
            keep = torch.cat([self.mem_valid, keep], 2)
        # The newest valid entries first, then the newest invalid ones; chronological order.
        L = k.shape[2]
        pos = torch.arange(L, device=k.device)
        rank = torch.where(keep, pos, pos - L)
        idx = rank.topk(min(self.hp["memory_size"], L), dim=-1).indices.sort(-1).values
        self.mem_valid = keep.gather(2, idx)
        self.mem_k = k.gather(2, idx[..., None].expand(*idx.shape, k.shape[-1])).detach()
        self.mem_v = v.gather(2, idx[..., None].expand(*idx.shape, v.shape[-1])).detach()

    def _check_store(self, k, v) -> None:
        _check_heads("knn_memory", k, self.hp["num_heads"])
        if self.mem_k is None:
            return
        want, got = (*self.mem_k.shape[:2], self.mem_k.shape[3], self.mem_v.shape[3]), \
            (*k.shape[:2], k.shape[3], v.shape[3])
        if want != got:
            raise ValueError(f"knn_memory: the store holds entries of (batch, heads, D, Dv) = "
                             f"{want}; this call has {got}. Call reset_memory() before a new "
                             f"batch of documents")

    def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
        self._check_store(k, v)
        mask = merge_masks(attn_mask, is_causal, q.shape[2], k.shape[2], q.device)
        local, _ = softmax_attention(q, k, v, mask, scale, dropout_p)
        out = local
        if self.mem_k is not None:
            mem, found = self._retrieve_and_attend(q, scale, dropout_p)
            g = torch.sigmoid(self.b_g).to(local.dtype).view(1, -1, 1, 1)
            out = torch.where(found, g * mem.to(local.dtype) + (1 - g) * local, local)
            dead = _dead_rows(mask)
            if dead is not None:  # a dead row stays the contract's zeros
                out = out.masked_fill(dead, 0.0)
        if self.hp["write"]:
            allowed = None if attn_mask is None else ~_dead_rows(attn_mask.transpose(-2, -1))
            self.remember(k, v, None if allowed is None else allowed.squeeze(-1))
        return out, None

    def _retrieve_and_attend(self, q, scale, dropout_p):
        """``(mem (B, H, Nq, Dv), found (B, H, Nq, 1))``: attention over each query's top-k
        stored entries, and whether it retrieved any valid entry."""
        work = work_dtype(q.dtype)
        mk, mv = self.mem_k.to(work), self.mem_v.to(work)
        kk = min(self.hp["topk"], mk.shape[2])
        outs, founds = [], []
        for i0 in range(0, q.shape[2], self.hp["chunk_size"]):
            qc = q[:, :, i0:i0 + self.hp["chunk_size"]].to(work)
            idx = self.retrieve(qc, kk)                                   # (B, H, c, kk)
            kc = mk.gather(2, idx.flatten(2)[..., None].expand(-1, -1, -1, mk.shape[-1]))
            vc = mv.gather(2, idx.flatten(2)[..., None].expand(-1, -1, -1, mv.shape[-1]))
            kc, vc = kc.view(*idx.shape, -1), vc.view(*idx.shape, -1)
            ok = self.mem_valid.gather(2, idx.flatten(2)).view(idx.shape)
            s = torch.einsum("bhcd,bhckd->bhck", qc * scale, kc)
            p = masked_softmax(s, ok)
            p = F.dropout(p, dropout_p) if dropout_p > 0 else p
            outs.append(torch.einsum("bhck,bhcke->bhce", p, vc))
            founds.append(ok.any(-1, keepdim=True))
        return torch.cat(outs, 2), torch.cat(founds, 2)

    @torch.no_grad()
    def retrieve(self, q: torch.Tensor, kk: int | None = None) -> torch.Tensor:
        """Indices ``(B, H, Nq, kk)`` into the store of each query's ``kk`` (``topk``)
        stored entries of largest ``q . k`` (invalid entries last)."""
        kk = min(self.hp["topk"] if kk is None else kk, self.stored)
        if self.hp["backend"] == "faiss":
            return self._faiss_search(q, kk)
        s = q.to(self.mem_k.dtype) @ self.mem_k.transpose(-2, -1)
        return s.masked_fill(~self.mem_valid[:, :, None, :], float("-inf")).topk(kk, -1).indices

    def _faiss_search(self, q, kk):
        import faiss  # optional: pip install faiss-cpu

        B, H, nq, _ = q.shape
        idx = torch.empty(B, H, nq, kk, dtype=torch.long)
        qs = q.detach().float().cpu().numpy()
        keys = self.mem_k.detach().float().cpu()
        valid = self.mem_valid.cpu()
        for b in range(B):
            for h in range(H):
                where = valid[b, h].nonzero().squeeze(1)
                index = faiss.IndexFlatIP(keys.shape[-1])
                index.add(keys[b, h, where].numpy())
                _, found = index.search(qs[b, h], kk)
                found = torch.from_numpy(found).long()
                # Fewer valid entries than kk: faiss pads with -1; point at an invalid one.
                spare = (~valid[b, h]).nonzero()
                fill = int(spare[0]) if len(spare) else 0
                idx[b, h] = torch.where(found >= 0, where[found.clamp_min(0)], fill)
        return idx.to(q.device)
