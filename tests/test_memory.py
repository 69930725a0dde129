"""Attention with a memory: persistent slots (all-attention) and the kNN store of
Memorizing Transformers.

persistent_memory: with no slot it is SDPA; with slots it is SDPA over the keys and values
with the slots appended and the mask extended by allowed columns (causal too), and the
float64 concatenation reference; dead rows stay zeros; the paper's initialisation.
knn_memory: an empty store is softmax attention; with ``topk`` >= the store its memory
branch is attention over the whole store (dense float64, written here); the retrieved set
is the brute-force top-k (torch and faiss); FIFO keeps the newest entries; stored entries
are detached, written only when asked, never padding; the gate mixes the two branches.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import naive_attention_f64
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
import attnlab.mechanisms.memory  # noqa: F401
from attnlab.mechanisms.memory import persistent_reference


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def qkv(B=2, H=2, nq=6, nk=6, d=4, seed=0):
    return rand(B, H, nq, d, seed=seed), rand(B, H, nk, d, seed=seed + 1), \
        rand(B, H, nk, d, seed=seed + 2)


def persistent(n, d=4, H=2, seed=0):
    torch.manual_seed(seed)
    return attnlab.create("persistent_memory", head_dim=d, num_heads=H, num_slots=n).double()


def knn(H=2, **hp):
    return attnlab.create("knn_memory", num_heads=H, **hp).double()


masks = st.sampled_from(["none", "bool", "float", "padding"])


def make_mask(kind, B, nq, nk, seed):
    """A mask of ``kind``; every row keeps one key (dead rows are tested on their own)."""
    if kind == "none":
        return None
    if kind == "padding":
        keep = rand(B, 1, 1, nk, seed=seed) > -0.7
        keep[..., 0] = True
        return keep
    keep = rand(B, 1, nq, nk, seed=seed) > -0.3
    keep[..., 0] = True
    if kind == "bool":
        return keep
    return torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, -math.inf) + \
        0.3 * rand(*keep.shape, seed=seed + 1)


# ---------------------------------------------------------------- persistent memory
@settings(max_examples=25)
@given(nq=st.integers(1, 9), nk=st.integers(1, 9), causal=st.booleans(), kind=masks,
       seed=st.integers(0, 2**16))
def test_persistent_with_zero_slots_is_sdpa(nq, nk, causal, kind, seed):
    q, k, v = qkv(nq=nq, nk=nk, seed=seed)
    mask = make_mask(kind, 2, nq, nk, seed)
    out = persistent(0)(q, k, v, attn_mask=mask, is_causal=causal)
    want_mask = mask
    if causal:  # SDPA takes one of the two: fold the causal rule into the mask
        c = torch.ones(nq, nk, dtype=torch.bool).tril()
        want_mask = c if mask is None else (mask & c if mask.dtype == torch.bool
                                            else mask.masked_fill(~c, -math.inf))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=want_mask)
    torch.testing.assert_close(out, want)


@settings(max_examples=25)
@given(nq=st.integers(1, 9), nk=st.integers(1, 9), n=st.integers(1, 5), causal=st.booleans(),
       kind=masks, seed=st.integers(0, 2**16))
def test_slots_are_attendable_under_any_mask_and_causally(nq, nk, n, causal, kind, seed):
    """SDPA over [K; M_k], [V; M_v] with the mask extended by True (0) columns."""
    q, k, v = qkv(nq=nq, nk=nk, seed=seed)
    m = persistent(n, seed=seed)
    M_k, M_v = (t.detach().expand(2, 2, n, 4) for t in m.slots())
    mask = make_mask(kind, 2, nq, nk, seed)
    full = torch.zeros(2, 2, nq, nk, dtype=torch.float64)
    if mask is not None:
        full = full + (mask.double().log() if mask.dtype == torch.bool else mask)
    if causal:
        full = full.masked_fill(~torch.ones(nq, nk, dtype=torch.bool).tril(), -math.inf)
    ext = torch.cat([full, torch.zeros(2, 2, nq, n, dtype=torch.float64)], -1)
    want = F.scaled_dot_product_attention(q, torch.cat([k, M_k], 2), torch.cat([v, M_v], 2),
                                          attn_mask=ext)
    out, w = m(q, k, v, attn_mask=mask, is_causal=causal, need_weights=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out, persistent_reference(q, k, v, mech=m, scale=None,
                                                         is_causal=causal, attn_mask=mask))
    assert (w.sum(-1) < 1).all()  # the slots take their share of every row
    p_slots = torch.softmax(torch.cat([q @ k.transpose(-2, -1) / 2 + full,
                                       q @ M_k.transpose(-2, -1) / 2], -1), -1)[..., nk:]
    torch.testing.assert_close(out, w @ v + p_slots @ M_v)


def test_a_row_with_no_context_key_is_dead_slots_included():
    q, k, v = (t.requires_grad_() for t in qkv())
    keep = torch.ones(6, 6, dtype=torch.bool)
    keep[2] = False
    m = persistent(4)
    out = m(q, k, v, attn_mask=keep)
    assert (out[:, :, 2] == 0).all() and (out[:, :, 3] != 0).all()
    out.square().sum().backward()
    assert (q.grad[:, :, 2] == 0).all()


def test_slots_init_as_the_paper_and_get_gradients():
    m = persistent(512, d=64, H=2)
    assert abs(float(m.M_k.detach().std()) - 64 ** -0.5) < 0.05 * 64 ** -0.5
    assert abs(float(m.M_v.detach().std()) - 512 ** -0.5) < 0.05 * 512 ** -0.5
    M_k, M_v = (t.detach() for t in m.slots())  # used rescaled: unit normal
    assert abs(float(M_k.std()) - 1) < 0.05 and abs(float(M_v.std()) - 1) < 0.05
    m = persistent(3)
    m(*qkv(), is_causal=True).square().sum().backward()
    assert m.M_k.grad.abs().sum() > 0 and m.M_v.grad.abs().sum() > 0


def test_persistent_refuses_other_sizes_and_bad_hparams():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="num_heads=3 .* does not match the H=2 heads"):
        persistent(2, H=3)(q, k, v)
    with pytest.raises(ValueError, match="head dims must equal head_dim=4.*Dv=3"):
        persistent(2)(q, k, v[..., :3])
    with pytest.raises(ValueError, match="'num_slots' must be >= 0; got -1"):
        attnlab.create("persistent_memory", head_dim=4, num_heads=2, num_slots=-1)
    with pytest.raises(TypeError, match="'num_slots' must be an int; got bool"):
        attnlab.create("persistent_memory", head_dim=4, num_heads=2, num_slots=True)


# ---------------------------------------------------------------- kNN memory
def dense_memory_f64(q, mk, mv, scale):
    """softmax(scale q mk^T) mv over the whole store, explicit exp / sum in float64."""
    s = q @ mk.transpose(-2, -1) * scale
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True) @ mv


@settings(max_examples=20)
@given(nq=st.integers(1, 8), nk=st.integers(1, 8), causal=st.booleans(), kind=masks,
       seed=st.integers(0, 2**16))
def test_empty_store_is_softmax_attention(nq, nk, causal, kind, seed):
    q, k, v = qkv(nq=nq, nk=nk, seed=seed)
    mask = make_mask(kind, 2, nq, nk, seed)
    out = knn(topk=2, chunk_size=3)(q, k, v, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(out, naive_attention_f64(q, k, v, mask, is_causal=causal))


@settings(max_examples=20)
@given(stored=st.integers(1, 12), extra=st.integers(0, 3), nq=st.integers(1, 7),
       causal=st.booleans(), seed=st.integers(0, 2**16))
def test_topk_covering_the_store_is_attention_over_the_whole_store(stored, extra, nq, causal,
                                                                   seed):
    q, k, v = qkv(nq=nq, nk=nq, seed=seed)
    mk, mv = rand(2, 2, stored, 4, seed=seed + 7), rand(2, 2, stored, 4, seed=seed + 8)
    m = knn(topk=stored + extra, chunk_size=2)
    with torch.no_grad():
        m.b_g.copy_(torch.tensor([-0.7, 1.3]))
    m.remember(mk, mv)
    g = torch.sigmoid(torch.tensor([-0.7, 1.3], dtype=torch.float64)).view(1, 2, 1, 1)
    want = g * dense_memory_f64(q, mk, mv, 0.5) + (1 - g) * naive_attention_f64(
        q, k, v, is_causal=causal)
    torch.testing.assert_close(m(q, k, v, is_causal=causal), want)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_the_retrieved_set_is_the_brute_force_top_k(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    m = knn(topk=5, memory_size=40, backend=backend, chunk_size=4)
    mk = rand(2, 2, 30, 4, seed=1)
    m.remember(mk, rand(2, 2, 30, 4, seed=2))
    q = rand(2, 2, 9, 4, seed=3)
    got = m.retrieve(q)
    for b in range(2):
        for h in range(2):
            for t in range(9):
                scores = [float(q[b, h, t] @ mk[b, h, j]) for j in range(30)]
                best = sorted(range(30), key=lambda j: -scores[j])[:5]
                assert set(got[b, h, t].tolist()) == set(best)
    # The memory branch uses exactly those entries: a store cut down to them gives it too.
    out = m(q, *qkv(nq=9, nk=9)[1:])
    twin = knn(topk=5)
    twin.remember(mk, rand(2, 2, 30, 4, seed=2))
    twin.mem_valid = torch.zeros_like(twin.mem_valid).scatter(
        2, got.flatten(2), True)  # an entry outside every query's top 5 changes nothing
    torch.testing.assert_close(twin(q, *qkv(nq=9, nk=9)[1:]), out)


def test_fifo_keeps_the_newest_memory_size_entries():
    m = knn(memory_size=7)
    written = []
    for step, n in enumerate([3, 4, 2, 5, 1]):
        k = rand(1, 2, n, 4, seed=step)
        v = torch.arange(len(written), len(written) + n, dtype=torch.float64)
        written += v.tolist()
        m.remember(k, v.view(1, 1, n, 1).expand(1, 2, n, 1))
        assert m.stored == min(7, len(written))
        assert m.mem_v[0, 1, :, 0].tolist() == written[-7:]


def test_stored_entries_are_detached_and_written_only_when_asked():
    q, k, v = (t.requires_grad_() for t in qkv())
    m = knn(topk=2)
    m(q, k, v)
    assert m.stored == 0  # write=False: a call changes nothing
    m = knn(topk=2, write=True)
    first = m(q, k, v, is_causal=True)  # reads the empty store, then writes
    torch.testing.assert_close(first, naive_attention_f64(q, k, v, is_causal=True))
    assert m.stored == 6 and not m.mem_k.requires_grad and m.mem_k.grad_fn is None
    torch.testing.assert_close(m.mem_k, k.detach())
    second = m(q, k, v, is_causal=True)
    second.sum().backward()  # through q and the gate only; the store stays a constant
    assert m.b_g.grad.abs().sum() > 0 and m.stored == 12
    assert "mem_k" not in m.state_dict() and m.float().mem_k.dtype == torch.float32


def test_padded_keys_are_never_written():
    q, k, v = qkv(nk=6)
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[1, ..., 3:] = False
    m = knn(topk=6, write=True)
    m(q, k, v, attn_mask=keep)
    assert m.mem_valid[0].all() and m.mem_valid[1, :, :3].all() and not m.mem_valid[1, :, 3:].any()
    with torch.no_grad():
        m.b_g.fill_(0.4)
    out = m(q, k, v, attn_mask=keep)
    g = torch.sigmoid(torch.tensor(0.4, dtype=torch.float64))
    mem = dense_memory_f64(q[1:], k[1:, :, :3], v[1:, :, :3], 0.5)
    local = naive_attention_f64(q[1:], k[1:], v[1:], keep[1:])
    torch.testing.assert_close(out[1:], g * mem + (1 - g) * local)


def test_dead_rows_stay_zeros_with_a_store():
    q, k, v = qkv()
    m = knn(topk=3)
    m.remember(k, v)
    keep = torch.ones(6, 6, dtype=torch.bool)
    keep[4] = False
    out = m(q, k, v, attn_mask=keep)
    assert (out[:, :, 4] == 0).all() and (out[:, :, 3] != 0).all()


def test_another_batch_needs_a_reset():
    m = knn()
    m.remember(*qkv()[1:])
    q, k, v = qkv(B=3)
    with pytest.raises(ValueError, match=r"\(batch, heads, D, Dv\) = \(2, 2, 4, 4\); this "
                                         r"call has \(3, 2, 4, 4\).*reset_memory\(\)"):
        m(q, k, v)
    m.reset_memory()
    assert m.stored == 0
    torch.testing.assert_close(m(q, k, v), naive_attention_f64(q, k, v))


@pytest.mark.parametrize("hp,exc,match", [
    ({"topk": 0}, ValueError, "'topk' must be >= 1; got 0"),
    ({"memory_size": 0}, ValueError, "'memory_size' must be >= 1; got 0"),
    ({"write": "yes"}, TypeError, "'write' must be a bool; got str"),
    ({"backend": "fais"}, ValueError, "did you mean 'faiss'"),
    ({"chunk_size": 1.0}, TypeError, "'chunk_size' must be an int"),
])
def test_bad_knn_hparams_are_refused(hp, exc, match):
    with pytest.raises(exc, match=match):
        knn(**hp)
