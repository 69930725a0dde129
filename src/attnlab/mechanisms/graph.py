"""Attention over a graph's edges: GAT and dot-product graph attention.

Node ``i`` attends only over its in-neighbours ``N(i) = {j : (j -> i) in E}``:

.. math:: \\alpha_{ij} = \\operatorname{softmax}_{j \\in N(i)}(e_{ij}), \\qquad
          out_i = \\sum_{j \\in N(i)} \\alpha_{ij} v_j,

with ``e_ij`` per mechanism:

* ``gat`` -- Veličković et al. 2018, eq. 3: ``e_ij = LeakyReLU(a^T [W h_i || W h_j])``.
  Splitting ``a = [a_dst || a_src]`` gives ``a_dst . (W h_i) + a_src . (W h_j)``; here the
  target's ``W h_i`` is ``q_i`` and the source's ``W h_j`` is ``k_j`` (a GAT layer passes the
  same ``W h`` as q, k and v), with one learnable ``a`` per head;
* ``graph_dot`` -- Dwivedi & Bresson 2020 (eq. 4), Shi et al. 2021 (TransformerConv):
  ``e_ij = q_i . k_j / sqrt(D)`` over the edges only.

The call is ``forward(q, k, v, *, edge_index, need_weights=False, dropout_p=0.0)``: ``q, k,
v`` are ``(B, H, N, D)`` node features per head (one graph for the whole batch) and
``edge_index`` is ``(2, E)`` int64, row 0 the source ``j``, row 1 the target ``i``. It is
edge-list based: scores ``(B, H, E)``, a segment softmax per target (``scatter_reduce``
amax, then ``index_add``), messages ``alpha_ij v_j`` ``(B, H, E, Dv)`` summed into their
targets; nothing of size ``N x N`` is ever made.

Conventions (a reviewer should know them):

* ``need_weights=True`` returns ``(out, alpha)`` with ``alpha`` ``(B, H, E)``, the weight
  of each edge in ``edge_index``'s column order (before dropout); :func:`dense_weights`
  spreads it into ``(B, H, N, N)`` where a dense view is wanted.
* A node with no in-edge gets an output row of zeros (the contract's fully masked row).
* Self-loops are the caller's choice: :func:`add_self_loops` adds the missing ones (the
  GAT paper's ``N(i)`` includes ``i``).
* Duplicate edges are refused, not merged: a repeated ``(j, i)`` would count twice in the
  softmax, which no adjacency matrix (the dense reference) can express.
* Half-precision inputs are computed in float32 and returned in their dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.contract import check_inputs, masked_softmax, work_dtype
from attnlab.mechanisms.base import Mechanism, empty_attention
from attnlab.registry import REQUIRED, HParam, Limit, Paper, create_for, register_mechanism
from attnlab.util.checks import check_int
from attnlab.verify import dense_softmax_f64, param_f64

__all__ = ["GATAttention", "GraphDotAttention", "GraphMechanism", "add_self_loops",
           "check_edge_index", "dense_weights", "random_graph", "to_adjacency"]

VELICKOVIC_2018 = Paper(
    "Graph Attention Networks",
    "Petar Veličković, Guillem Cucurull, Arantxa Casanova, Adriana Romero, Pietro Liò, "
    "Yoshua Bengio", 2018, "https://arxiv.org/abs/1710.10903")
DWIVEDI_2020 = Paper(
    "A Generalization of Transformer Networks to Graphs",
    "Vijay Prakash Dwivedi and Xavier Bresson", 2020, "https://arxiv.org/abs/2012.09699")


# ---------------------------------------------------------------- edge lists
def check_edge_index(edge_index, num_nodes: int) -> torch.Tensor:
    """``edge_index`` if it is a valid ``(2, E)`` int64 edge list over ``num_nodes`` nodes
    without duplicate edges; else ``TypeError``/``ValueError`` naming ``edge_index``."""
    check_int("num_nodes", num_nodes, low=0)
    if not isinstance(edge_index, torch.Tensor):
        raise TypeError(f"edge_index must be a torch.Tensor (2, E) of int64; got "
                        f"{type(edge_index).__name__}")
    if edge_index.dtype != torch.int64:
        hint = "" if edge_index.is_floating_point() else "; use edge_index.long()"
        raise TypeError(f"edge_index must be int64 (torch.long); got "
                        f"{edge_index.dtype}{hint}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must be 2-D (2, E), row 0 the sources and row 1 "
                         f"the targets; got shape {tuple(edge_index.shape)}")
    if edge_index.numel() == 0:
        return edge_index
    lo, hi = int(edge_index.min()), int(edge_index.max())
    if lo < 0 or hi >= num_nodes:
        raise ValueError(f"edge_index node ids must be in [0, {num_nodes - 1}] "
                         f"({num_nodes} nodes); got ids in [{lo}, {hi}]")
    key = torch.sort(edge_index[1] * num_nodes + edge_index[0]).values
    same = (key[1:] == key[:-1]).nonzero()
    if same.numel():
        k = int(key[int(same[0])])
        raise ValueError(f"edge_index holds duplicate edges (first: {k % num_nodes} -> "
                         f"{k // num_nodes}); each (source, target) pair may appear once: "
                         f"remove them with torch.unique(edge_index, dim=1)")
    return edge_index


def add_self_loops(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``edge_index`` with an edge ``i -> i`` appended for every node that has none (so a
    valid edge list stays free of duplicates)."""
    check_edge_index(edge_index, num_nodes)
    has = torch.zeros(num_nodes, dtype=torch.bool, device=edge_index.device)
    has[edge_index[0][edge_index[0] == edge_index[1]]] = True
    loops = (~has).nonzero().flatten()
    return torch.cat([edge_index, loops.expand(2, -1)], dim=1)


def to_adjacency(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``(N, N)`` bool, ``[i, j]`` True iff edge ``j -> i``: row ``i`` is what node ``i``
    attends (the dense attention mask of the graph)."""
    check_edge_index(edge_index, num_nodes)
    adj = torch.zeros(num_nodes, num_nodes, dtype=torch.bool, device=edge_index.device)
    adj[edge_index[1], edge_index[0]] = True
    return adj


def dense_weights(alpha: torch.Tensor, edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Per-edge weights ``(..., E)`` as a dense ``(..., N, N)`` matrix (``[i, j]`` the weight
    of ``j -> i``, zero off the edges): for inspection only, it is ``N x N``."""
    out = alpha.new_zeros(*alpha.shape[:-1], num_nodes, num_nodes)
    out[..., edge_index[1], edge_index[0]] = alpha
    return out


def random_graph(n: int, generator: torch.Generator, degree: float = 4.0) -> torch.Tensor:
    """A seeded directed Erdős–Rényi graph, each edge with probability ``degree / n``
    (self-loops among them), where every node ``i = 3 mod 7`` loses its in-edges: the
    correctness gate's graph, with nodes that attend nothing."""
    adj = torch.rand(n, n, generator=generator) < min(1.0, degree / n)
    adj[torch.arange(n) % 7 == 3] = False
    dst, src = adj.nonzero(as_tuple=True)
    return torch.stack([src, dst])


# ---------------------------------------------------------------- the segment softmax
def segment_softmax(scores: torch.Tensor, dst: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``alpha`` ``(B, H, E)``: softmax of ``scores`` over the edges sharing a target.

    The per-target max is a constant shift (softmax does not depend on it), so it is taken
    from detached scores and needs no gradient; every target of an edge has a max, and its
    denominator is at least ``exp(0) = 1``."""
    idx = dst.expand_as(scores)
    m = scores.new_full((*scores.shape[:-1], num_nodes), -math.inf)
    m = m.scatter_reduce(-1, idx, scores.detach(), reduce="amax", include_self=True)
    e = torch.exp(scores - m.index_select(-1, dst))
    z = e.new_zeros(m.shape).index_add(-1, dst, e)
    return e / z.index_select(-1, dst)


class GraphMechanism(Mechanism):
    """Base of the graph mechanisms: scores on edges (:meth:`edge_scores`), a segment
    softmax and a scatter of messages. Subclasses give ``edge_scores(q, k, src, dst)``
    ``(B, H, E)`` and ``dense_scores(q, k)`` ``(B, H, N, N)``, the same scores for every
    pair (the masked-dense path, :meth:`dense`, used for comparison only)."""

    def forward(self, q, k, v, *, edge_index=None, need_weights: bool = False,
                dropout_p: float = 0.0, **contract):
        """``out`` ``(B, H, N, Dv)``, or ``(out, alpha)`` with ``alpha`` ``(B, H, E)`` the
        weight of each edge (``need_weights``); ``dropout_p`` drops edge weights.

        ``edge_index`` is required; the (q, k, v) contract's other arguments (``attn_mask``,
        ``is_causal``, ...) are refused by name: a layer built for sequences that calls a
        graph mechanism learns why, not just that a keyword is unexpected."""
        if edge_index is None or contract:
            got = f"; got {', '.join(sorted(contract))}" if contract else ""
            raise TypeError(f"{self.spec.name} is a graph mechanism (inputs='graph'): call "
                            f"forward(q, k, v, *, edge_index, need_weights=False, "
                            f"dropout_p=0.0) with edge_index (2, E){got}")
        check_inputs(q, k, v, dropout_p=dropout_p, need_weights=need_weights, spec=self.spec)
        B, H, N, _ = q.shape
        self._check_heads(q)
        check_edge_index(edge_index, N)
        if edge_index.device != q.device:
            raise ValueError(f"{self.spec.name}: edge_index is on {edge_index.device} but q is "
                             f"on {q.device}")
        E = edge_index.shape[1]
        if B * H * N * E == 0:  # no edge to score: zeros, connected to the inputs
            out, _ = empty_attention(q, k, v, False, tuple(self.parameters()))
            return (out, q.new_zeros(B, H, E) + out.sum()) if need_weights else out
        src, dst = edge_index[0], edge_index[1]
        work = work_dtype(q.dtype)
        qw, kw, vw = q.to(work), k.to(work), v.to(work)
        alpha = segment_softmax(self.edge_scores(qw, kw, src, dst), dst, N)
        a = F.dropout(alpha, dropout_p) if dropout_p > 0 else alpha
        messages = a.unsqueeze(-1) * vw.index_select(2, src)              # (B, H, E, Dv)
        out = vw.new_zeros(B, H, N, v.shape[-1]).index_add(2, dst, messages).to(q.dtype)
        return (out, alpha.to(q.dtype)) if need_weights else out

    def dense(self, q, k, v, *, adjacency: torch.Tensor, dropout_p: float = 0.0,
              need_weights: bool = False):
        """The same attention as a masked dense softmax over all ``N x N`` pairs
        (``adjacency`` from :func:`to_adjacency`): O(N^2), the reference path."""
        check_inputs(q, k, v, dropout_p=dropout_p, need_weights=need_weights, spec=self.spec)
        self._check_heads(q)
        N = q.shape[2]
        if not (isinstance(adjacency, torch.Tensor) and adjacency.dtype == torch.bool
                and adjacency.shape == (N, N)):
            got = (f"{adjacency.dtype} {tuple(adjacency.shape)}"
                   if isinstance(adjacency, torch.Tensor) else type(adjacency).__name__)
            raise ValueError(f"{self.spec.name}: adjacency must be a bool ({N}, {N}) tensor "
                             f"(to_adjacency); got {got}")
        work = work_dtype(q.dtype)
        p = masked_softmax(self.dense_scores(q.to(work), k.to(work)), adjacency)
        p_used = F.dropout(p, dropout_p) if dropout_p > 0 else p
        out = (p_used @ v.to(work)).to(q.dtype)
        return (out, p.to(q.dtype)) if need_weights else out

    def _check_heads(self, q) -> None:
        """Mechanisms with per-head parameters check ``H`` and ``D`` here."""

    def edge_scores(self, q, k, src, dst):
        raise NotImplementedError

    def dense_scores(self, q, k):
        raise NotImplementedError


# ---------------------------------------------------------------- the correctness gate
def _adjacency_f64(edge_index: torch.Tensor, n: int) -> torch.Tensor:
    adj = torch.zeros(n, n, dtype=torch.bool)
    for j, i in edge_index.t().tolist():
        adj[i, j] = True
    return adj


def gat_reference(q, k, v, edge_index, mech) -> torch.Tensor:
    """Eq. 3 of the paper for every pair, masked by the adjacency, in float64."""
    a_src, a_dst = param_f64(mech.a_src), param_f64(mech.a_dst)
    e = (torch.einsum("bhid,hd->bhi", q, a_dst).unsqueeze(-1)
         + torch.einsum("bhjd,hd->bhj", k, a_src).unsqueeze(-2))
    e = torch.where(e > 0, e, mech.hp["negative_slope"] * e)
    return dense_softmax_f64(e, v, _adjacency_f64(edge_index, q.shape[2]))


def graph_dot_reference(q, k, v, edge_index, mech) -> torch.Tensor:
    """``q_i . k_j / sqrt(D)`` for every pair, masked by the adjacency, in float64."""
    e = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return dense_softmax_f64(e, v, _adjacency_f64(edge_index, q.shape[2]))


def _gate(reference):
    """The gate of :class:`~attnlab.registry.Limit`: a seeded random graph of ``n`` nodes
    (:func:`random_graph`) and seeded ``q, k, v``; the mechanism against ``reference``."""

    def gate(spec, *, n, head_dim, num_heads, batch, dtype, causal, device, seed, hparams):
        gen = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(batch, num_heads, n, head_dim, generator=gen,
                               dtype=torch.float64).to(dtype) for _ in range(3))
        edge_index = random_graph(n, gen)
        hp = {**hparams, **spec.limit.hparams(n)}
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            mech = create_for(spec.name, head_dim=head_dim, num_heads=num_heads, **hp)
            mech = mech.to(device).eval()
            out = mech(q.to(device), k.to(device), v.to(device),
                       edge_index=edge_index.to(device))
        return out, reference(q.double(), k.double(), v.double(), edge_index, mech)

    return gate


_FLAGS = dict(family="graph", exact=True, causal=False, arbitrary_mask=False, cross=False,
              returns_weights=True, inputs="graph")


@register_mechanism(
    "gat",
    paper=VELICKOVIC_2018,
    time="O(E D + N D)",
    memory="O(E D) (scores O(E), messages alpha_ij v_j O(E D))",
    equation="alpha_ij = softmax_{j in N(i)} LeakyReLU(a_dst . q_i + a_src . k_j),  "
             "out_i = sum_j alpha_ij v_j",
    learnable=True,
    hparams=[
        HParam("head_dim", int, REQUIRED, "size D of each head (F' in the paper)", low=1),
        HParam("num_heads", int, REQUIRED, "heads K, each with its own a", low=1),
        HParam("negative_slope", float, 0.2, "LeakyReLU slope for e_ij < 0", low=0.0),
    ],
    limit=Limit(hparams=lambda n: {}, note="exact: eq. 3 on a random graph's edges",
                gate=_gate(gat_reference)),
    **_FLAGS,
)
class GATAttention(GraphMechanism):
    """GAT attention (Veličković et al. 2018): ``e_ij = LeakyReLU(a_dst . q_i + a_src . k_j)``.

    ``a = [a_dst || a_src]`` (``2 D`` per head) is the paper's single-layer feedforward
    attention, Glorot-initialised as that layer (fan-in ``2 D``, fan-out 1). The per-node
    terms ``a_dst . q_i`` and ``a_src . k_j`` are computed once per node, then gathered
    onto the edges: scoring costs O(N D + E), not O(E D)."""

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        H, D = self.hp["num_heads"], self.hp["head_dim"]
        bound = math.sqrt(6.0 / (2 * D + 1))
        self.a_src = nn.Parameter(torch.empty(H, D).uniform_(-bound, bound))
        self.a_dst = nn.Parameter(torch.empty(H, D).uniform_(-bound, bound))

    def _check_heads(self, q) -> None:
        H, D = self.hp["num_heads"], self.hp["head_dim"]
        if q.shape[1] != H or q.shape[-1] != D:
            raise ValueError(f"gat: q has {q.shape[1]} heads of size {q.shape[-1]} but the "
                             f"module was built with num_heads={H}, head_dim={D}")

    def _terms(self, q, k):
        a_src, a_dst = self.a_src.to(q.dtype), self.a_dst.to(q.dtype)
        return (torch.einsum("bhnd,hd->bhn", q, a_dst),
                torch.einsum("bhnd,hd->bhn", k, a_src))

    def edge_scores(self, q, k, src, dst):
        t_dst, t_src = self._terms(q, k)
        e = t_dst.index_select(-1, dst) + t_src.index_select(-1, src)
        return F.leaky_relu(e, self.hp["negative_slope"])

    def dense_scores(self, q, k):
        t_dst, t_src = self._terms(q, k)
        return F.leaky_relu(t_dst.unsqueeze(-1) + t_src.unsqueeze(-2), self.hp["negative_slope"])


@register_mechanism(
    "graph_dot",
    paper=DWIVEDI_2020,
    time="O(E D)",
    memory="O(E D) (gathered q_i, k_j and messages per edge)",
    equation="alpha_ij = softmax_{j in N(i)} (q_i . k_j / sqrt(D)),  out_i = sum_j alpha_ij v_j",
    aliases=("graph_transformer",),
    limit=Limit(hparams=lambda n: {}, note="exact: q_i . k_j / sqrt(D) on a random graph's edges",
                gate=_gate(graph_dot_reference)),
    **_FLAGS,
)
class GraphDotAttention(GraphMechanism):
    """Dot-product graph attention (Dwivedi & Bresson 2020; Shi et al. 2021's
    TransformerConv): the Transformer's ``q_i . k_j / sqrt(D)``, on the edges only."""

    def edge_scores(self, q, k, src, dst):
        s = (q.index_select(2, dst) * k.index_select(2, src)).sum(-1)
        return s / math.sqrt(q.shape[-1])

    def dense_scores(self, q, k):
        return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
