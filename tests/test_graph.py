"""Graph attention (``gat``, ``graph_dot``): attention over a graph's in-edges only.

Evidence: the output equals a plain per-node softmax over the in-neighbours written here
(hypothesis over graphs with isolated nodes, self-loops and shuffled edge lists), nothing
off the edges can change a node's output, relabelling the nodes relabels the outputs,
gradients pass gradcheck, no N x N tensor exists at N = 4096, and bad edge lists are
refused with errors naming ``edge_index``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LargestTensor
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

import attnlab
import attnlab.mechanisms.graph  # noqa: F401  (registers the family)
from attnlab.mechanisms import graph
from attnlab.mechanisms.graph import add_self_loops, dense_weights, to_adjacency
from attnlab.verify import verify

NAMES = ["gat", "graph_dot"]


def build(name, D=4, H=2, **hp):
    torch.manual_seed(0)
    return attnlab.create_for(name, head_dim=D, num_heads=H, **hp).double()


def edges(pairs) -> torch.Tensor:
    """``[(j, i), ...]`` (source, target) as a (2, E) edge list."""
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).t().contiguous()


def plain_scores(mech, q, k):
    """e_ij for one (b, h) pair, every (i, j), from the papers' formulas."""
    D = q.shape[-1]
    if mech.spec.name == "graph_dot":
        return lambda b, h, i, j: float(q[b, h, i] @ k[b, h, j]) / math.sqrt(D)
    a_src, a_dst = mech.a_src.detach().double(), mech.a_dst.detach().double()
    slope = mech.hp["negative_slope"]

    def e(b, h, i, j):
        x = float(a_dst[h] @ q[b, h, i] + a_src[h] @ k[b, h, j])
        return x if x > 0 else slope * x
    return e


def plain_graph_attention(mech, q, k, v, edge_index):
    """out_i = sum_{j in N(i)} softmax_j(e_ij) v_j, node by node, and alpha per edge."""
    B, H, N, _ = q.shape
    e = plain_scores(mech, q, k)
    pairs = [(int(j), int(i)) for j, i in edge_index.t()]
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    alpha = torch.zeros(B, H, len(pairs), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                mine = [(n, j) for n, (j, t) in enumerate(pairs) if t == i]
                if not mine:
                    continue
                s = [e(b, h, i, j) for _, j in mine]
                top = max(s)
                w = [math.exp(x - top) for x in s]
                for (n, j), wj in zip(mine, w, strict=True):
                    alpha[b, h, n] = wj / sum(w)
                    out[b, h, i] += alpha[b, h, n] * v[b, h, j]
    return out, alpha


def qkv(B, H, N, D, Dv=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, d, generator=g, dtype=dtype) for d in (D, D, Dv or D))


# ---------------------------------------------------------------- registry and gate
@pytest.mark.parametrize("name", NAMES)
def test_registered_outside_the_qkv_contract(name):
    s = attnlab.get(name)
    assert s.family == "graph" and s.inputs == "graph" and s.limit.gate is not None
    assert name not in attnlab.list_mechanisms()
    assert name in attnlab.list_mechanisms(inputs="graph") and name in attnlab.list_mechanisms(
        inputs=None)
    assert (s.causal, s.cross, s.arbitrary_mask, s.returns_weights) == (False, False, False, True)
    assert s.learnable == (name == "gat")
    assert "N^2" not in s.memory


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_gate_passes(name, dtype):
    r = verify(name, dtype=dtype, n=40, seed=3)
    assert r.ok, r.message


def test_gate_fails_a_wrong_softmax(monkeypatch):
    """The gate has power: a softmax over all edges (not per target) is caught."""
    monkeypatch.setattr(graph, "segment_softmax", lambda s, dst, n: s.softmax(-1))
    for name in NAMES:
        r = verify(name)
        assert not r.ok and r.error > 1e-2, r.message


def test_gate_fails_reversed_edges(monkeypatch):
    """Attending out-edges instead of in-edges is caught too."""
    forward = graph.GraphMechanism.forward
    monkeypatch.setattr(graph.GraphMechanism, "forward", lambda self, q, k, v, *, edge_index,
                        **kw: forward(self, q, k, v, edge_index=edge_index.flip(0), **kw))
    assert not verify("graph_dot").ok


# ---------------------------------------------------------------- the equation
@st.composite
def graphs(draw):
    n = draw(st.integers(1, 7))
    adj = [[draw(st.booleans()) for _ in range(n)] for _ in range(n)]
    pairs = [(j, i) for i in range(n) for j in range(n) if adj[i][j]]
    pairs = draw(st.permutations(pairs))  # any column order
    return n, edges(pairs)


@pytest.mark.parametrize("name", NAMES)
@given(g=graphs(), B=st.integers(1, 2), H=st.integers(1, 2), D=st.integers(1, 4),
       Dv=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_equals_plain_attention_over_in_neighbours(name, g, B, H, D, Dv, seed):
    n, ei = g
    mech = build(name, D=D, H=H)
    q, k, v = qkv(B, H, n, D, Dv, seed)
    out, alpha = mech(q, k, v, edge_index=ei, need_weights=True)
    want, want_alpha = plain_graph_attention(mech, q, k, v, ei)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(alpha, want_alpha, rtol=1e-10, atol=1e-12)
    # the masked-dense path agrees, and its weights are the per-edge ones spread out
    dense, p = mech.dense(q, k, v, adjacency=to_adjacency(ei, n), need_weights=True)
    torch.testing.assert_close(dense, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p, dense_weights(alpha, ei, n), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_nothing_off_the_edges_reaches_a_node(name):
    """Node i's output is bitwise the same whatever the nodes outside N(i) hold; weights
    sum to 1 over each node's in-edges; a node without in-edges gets exact zeros."""
    n = 12
    ei = graph.random_graph(n, torch.Generator().manual_seed(1), degree=3.0)
    mech = build(name, D=4, H=2)
    q, k, v = qkv(2, 2, n, 4, 3, seed=2)
    out, alpha = mech(q, k, v, edge_index=ei, need_weights=True)
    adj = to_adjacency(ei, n)
    for i in range(n):
        others = ~adj[i]
        others[i] = False
        q2, k2, v2 = (t.clone() for t in (q, k, v))
        for t in (q2, k2, v2):
            t[:, :, others] = torch.randn_like(t[:, :, others]) * 100
        assert torch.equal(mech(q2, k2, v2, edge_index=ei)[:, :, i], out[:, :, i])
    sums = torch.zeros(2, 2, n, dtype=torch.float64).index_add(-1, ei[1], alpha)
    has_in = adj.any(dim=1)
    assert not has_in.all() and has_in.any()  # the graph has both kinds of node
    torch.testing.assert_close(sums[..., has_in], torch.ones_like(sums[..., has_in]))
    assert torch.equal(out[:, :, ~has_in], torch.zeros_like(out[:, :, ~has_in]))


@pytest.mark.parametrize("name", NAMES)
def test_relabelling_nodes_relabels_outputs(name):
    n = 15
    ei = graph.random_graph(n, torch.Generator().manual_seed(4))
    mech = build(name, D=4, H=2)
    q, k, v = qkv(2, 2, n, 4, seed=5)
    out, alpha = mech(q, k, v, edge_index=ei, need_weights=True)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(6))  # old i -> perm[i]

    def relabel(t):
        r = torch.empty_like(t)
        r[:, :, perm] = t
        return r

    out2, alpha2 = mech(*(relabel(t) for t in (q, k, v)), edge_index=perm[ei],
                        need_weights=True)
    torch.testing.assert_close(out2[:, :, perm], out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(alpha2, alpha, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name):
    ei = edges([(0, 1), (2, 1), (1, 1), (1, 2), (3, 0), (0, 3)] + [(4, 0)])  # node 4: no in-edge
    mech = build(name, D=3, H=2)
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 5, 3, 2, seed=7))
    params = {n: p.detach().clone().requires_grad_() for n, p in mech.named_parameters()}

    def f(q, k, v, *ps):
        return functional_call(mech, dict(zip(params, ps, strict=True)), (q, k, v),
                               {"edge_index": ei})

    assert torch.autograd.gradcheck(f, (q, k, v, *params.values()), eps=1e-6, atol=1e-7)
    # the node without in-edges sends no gradient back through its own query
    f(q, k, v, *params.values()).sum().backward()
    assert torch.equal(q.grad[:, :, 4], torch.zeros_like(q.grad[:, :, 4]))


@pytest.mark.parametrize("name", NAMES)
def test_dropout_drops_edge_weights(name):
    """With ``dropout_p`` the messages are those of the dropped weights (same RNG draw)."""
    n, p = 10, 0.5
    ei = add_self_loops(graph.random_graph(n, torch.Generator().manual_seed(8)), n)
    mech = build(name)
    q, k, v = qkv(1, 2, n, 4, seed=9)
    alpha = mech(q, k, v, edge_index=ei, need_weights=True)[1]
    torch.manual_seed(10)
    out, alpha_again = mech(q, k, v, edge_index=ei, need_weights=True, dropout_p=p)
    torch.manual_seed(10)
    dropped = F.dropout(alpha, p)
    torch.testing.assert_close(alpha_again, alpha)  # the weights returned are pre-dropout
    torch.testing.assert_close(out, dense_weights(dropped, ei, n) @ v)
    assert not torch.allclose(out, mech(q, k, v, edge_index=ei))


# ---------------------------------------------------------------- memory: O(E), never N x N
@pytest.mark.parametrize("name", NAMES)
def test_no_n_by_n_tensor_at_4096_nodes(name):
    N, B, H, D = 4096, 1, 2, 8
    g = torch.Generator().manual_seed(0)
    ei = torch.unique(torch.stack([torch.randint(0, N, (8 * N,), generator=g),
                                   torch.arange(N).repeat_interleave(8)]), dim=1)
    E = ei.shape[1]
    mech = attnlab.create_for(name, head_dim=D, num_heads=H)
    q, k, v = (t.float().requires_grad_() for t in qkv(B, H, N, D, seed=1))
    with LargestTensor() as mode:
        out, alpha = mech(q, k, v, edge_index=ei, need_weights=True)
        out.sum().backward()
    assert alpha.shape == (B, H, E)
    assert mode.largest <= B * H * E * D < N * N // 8, mode.largest
    # the monitor sees an N x N tensor where there is one: the dense path, at N = 512
    small = 512
    with LargestTensor() as mode:
        mech.dense(q[:, :, :small], k[:, :, :small], v[:, :, :small],
                   adjacency=torch.ones(small, small, dtype=torch.bool))
    assert mode.largest >= small * small


# ---------------------------------------------------------------- edge cases and precision
@pytest.mark.parametrize("name", NAMES)
def test_empty_graphs_give_zeros(name):
    mech = build(name)
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 5, 4, 3))
    out, alpha = mech(q, k, v, edge_index=edges([]), need_weights=True)
    assert out.shape == (2, 2, 5, 3) and alpha.shape == (2, 2, 0)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(v))
    none = mech(*qkv(2, 2, 0, 4), edge_index=edges([]))
    assert none.shape == (2, 2, 0, 4)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_float32(name, dtype):
    n = 30
    ei = graph.random_graph(n, torch.Generator().manual_seed(11))
    mech = attnlab.create_for(name, head_dim=16, num_heads=2)
    q, k, v = (t.to(dtype) for t in qkv(2, 2, n, 16, seed=12))
    out, alpha = mech(q, k, v, edge_index=ei, need_weights=True)
    assert out.dtype == alpha.dtype == dtype
    ref = mech.double()(q.double(), k.double(), v.double(), edge_index=ei)
    assert (out.double() - ref).abs().max() / ref.abs().max() < 2e-2


def test_add_self_loops_adds_only_the_missing_ones():
    ei = edges([(0, 1), (1, 1), (2, 0)])
    out = add_self_loops(ei, 4)
    assert out[:, :3].equal(ei)  # the given edges first, unchanged
    assert sorted(map(tuple, out[:, 3:].t().tolist())) == [(0, 0), (2, 2), (3, 3)]
    assert add_self_loops(out, 4).equal(out)
    assert to_adjacency(out, 4).diagonal().all()


# ---------------------------------------------------------------- bad input
BAD_EDGES = [
    ([[0, 1], [1, 0]], TypeError, "edge_index must be a torch.Tensor"),
    (torch.tensor([[0, 1], [1, 0]], dtype=torch.int32), TypeError, "int64.*edge_index.long"),
    (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), TypeError, "edge_index must be int64"),
    (torch.tensor([0, 1, 2]), ValueError, r"edge_index must be 2-D \(2, E\).*\(3,\)"),
    (torch.tensor([[0, 1], [1, 0], [2, 2]]), ValueError, r"\(2, E\).*\(3, 2\)"),
    (torch.tensor([[0, -1], [1, 0]]), ValueError, r"edge_index node ids must be in \[0, 4\]"),
    (torch.tensor([[0, 5], [1, 0]]), ValueError, r"5 nodes.*\[0, 5\]"),
    (torch.tensor([[0, 2, 0], [1, 1, 1]]), ValueError, "duplicate edges.*0 -> 1.*torch.unique"),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad, exc, match", BAD_EDGES)
def test_bad_edge_index_is_refused(name, bad, exc, match):
    mech = build(name)
    with pytest.raises(exc, match=match):
        mech(*qkv(1, 2, 5, 4), edge_index=bad)


@pytest.mark.parametrize("name", NAMES)
def test_bad_features_are_refused(name):
    mech = build(name)
    q, k, v = qkv(1, 2, 5, 4)
    ei = edges([(0, 1)])
    with pytest.raises(ValueError, match=r"Nq == Nk"):
        mech(q, k[:, :, :4], v[:, :, :4], edge_index=ei)
    with pytest.raises(TypeError, match="graph mechanism.*edge_index"):
        mech(q, k, v)  # edge_index is required
    with pytest.raises(TypeError, match="graph mechanism.*got attn_mask, is_causal"):
        mech(q, k, v, edge_index=ei, is_causal=False, attn_mask=None)  # not the qkv contract
    with pytest.raises(ValueError, match="adjacency must be a bool"):
        mech.dense(q, k, v, adjacency=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p"):
        mech(q, k, v, edge_index=ei, dropout_p=1.5)


def test_gat_checks_heads_and_head_dim():
    mech = build("gat", D=4, H=2)
    with pytest.raises(ValueError, match="3 heads of size 4.*num_heads=2, head_dim=4"):
        mech(*qkv(1, 3, 5, 4), edge_index=edges([(0, 1)]))
    with pytest.raises(ValueError, match="negative_slope"):
        attnlab.create_for("gat", head_dim=4, num_heads=2, negative_slope=-1.0)
