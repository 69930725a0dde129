"""KVCache: incremental decoding with MultiheadAttention equals the full causal forward.

The reference for every decoding schedule is the same layer run once, causally, on the
whole sequence (itself checked against softmax attention in test_nn.py); the cache's
contents are checked against keys rotated independently at their absolute positions.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.nn import KVCache, MultiheadAttention
from attnlab.registry import Paper, register_mechanism

E, H, HKV, N = 16, 4, 2, 9
TIGHT = dict(atol=1e-12, rtol=1e-10)
KV_CACHE = attnlab.list_mechanisms(kv_cache=True)
# Small tiles so flash's bottom-right decoding mask crosses tile boundaries.
EXTRA = {"flash": {"block_q": 2, "block_k": 3}}


def layer(name="sdpa", positions=None, num_kv_heads=HKV, seed=0, **kw):
    torch.manual_seed(seed)
    m = MultiheadAttention(E, H, name, num_kv_heads=num_kv_heads, positions=positions,
                           **{**EXTRA.get(name, {}), **kw})
    for p in m.parameters():  # non-zero biases, so a bias applied twice would show
        torch.nn.init.normal_(p, std=0.3)
    return m.double().eval()


def tokens(B=2, n=N, seed=1):
    return torch.randn(B, n, E, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def decode(m, x, sizes, cache=None):
    """Feed ``x`` in consecutive chunks of ``sizes``; the outputs concatenated."""
    cache = KVCache() if cache is None else cache
    outs, t = [], 0
    for s in sizes:
        outs.append(m(x[:, t:t + s], kv_cache=cache))
        t += s
    assert t == x.shape[1] and cache.length == t
    return torch.cat(outs, dim=1)


def test_kv_cache_flag_is_exactly_the_softmax_family_with_cross_attention():
    assert KV_CACHE == sorted(["sdpa", "reference", "flash", "dot", "scaled_dot", "general",
                               "additive", "topk", "hard", "hybrid", "sigmoid", "differential"])
    for name in attnlab.list_mechanisms():
        s = attnlab.get(name)
        assert s.to_dict()["kv_cache"] is s.kv_cache
        if s.kv_cache:  # decoding needs both: Nq != Nk and a causal form
            assert s.causal and s.cross and s.arbitrary_mask


SCHEDULES = {"tokens": [1] * N, "chunks_of_3": [3, 3, 3], "prefill_then_tokens": [5, 1, 1, 1, 1],
             "ragged": [2, 4, 1, 2]}


@pytest.mark.parametrize("positions", [None, "rope", "alibi"])
@pytest.mark.parametrize("name", KV_CACHE)
def test_decoding_equals_full_causal_forward(name, positions):
    m = layer(name, positions)
    x = tokens()
    full = m(x, is_causal=True)
    for sched, sizes in SCHEDULES.items():
        torch.testing.assert_close(decode(m, x, sizes), full, **TIGHT, msg=sched)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_decoding_with_every_grouping(num_kv_heads):
    m = layer("reference", "rope", num_kv_heads=num_kv_heads)
    x = tokens(B=3)
    torch.testing.assert_close(decode(m, x, [4, 1, 3, 1]), m(x, is_causal=True), **TIGHT)


@settings(max_examples=20)
@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=6), B=st.integers(1, 3),
       positions=st.sampled_from([None, "rope", "alibi"]), seed=st.integers(0, 2**16))
def test_any_chunking_equals_full_causal_forward(sizes, B, positions, seed):
    m = layer("sdpa", positions, seed=seed)
    x = tokens(B, sum(sizes), seed=seed + 1)
    torch.testing.assert_close(decode(m, x, sizes), m(x, is_causal=True), **TIGHT)


def test_cache_holds_keys_rotated_at_absolute_positions():
    m = layer("sdpa", "rope")
    x = tokens()
    cache = KVCache()
    decode(m, x, [2, 1, 4, 2], cache)
    # Independently: project the whole sequence, split the Hkv heads, rotate from 0.
    D = E // H
    k = m.k_proj(x).view(2, N, HKV, D).transpose(1, 2)
    v = m.v_proj(x).view(2, N, HKV, D).transpose(1, 2)
    torch.testing.assert_close(cache.k, m.rotary.rotate(k, 0), **TIGHT)
    torch.testing.assert_close(cache.v, v, **TIGHT)
    assert cache.k.shape == (2, HKV, N, D)  # grouped heads are cached once, not expanded


def test_weights_and_masks_while_decoding():
    m = layer("reference", "alibi")
    x = tokens()
    allowed = torch.rand(N, N, generator=torch.Generator().manual_seed(3)) > 0.3
    allowed.fill_diagonal_(True)
    full, w_full = m(x, attn_mask=allowed, is_causal=True, need_weights=True)
    cache, t = KVCache(), 0
    for s in (4, 1, 3, 1):
        out, w = m(x[:, t:t + s], kv_cache=cache, attn_mask=allowed[t:t + s, :t + s],
                   need_weights=True)
        assert w.shape == (2, H, s, t + s)
        torch.testing.assert_close(out, full[:, t:t + s], **TIGHT)
        torch.testing.assert_close(w, w_full[:, :, t:t + s, :t + s], **TIGHT)
        t += s
    assert (w_full.triu(1) == 0).all()  # the full weights were causal: nothing compared away


def test_sequence_first_layout_decodes_too():
    m = layer("sdpa", "rope", batch_first=False)
    x = tokens().transpose(0, 1)  # (N, B, E)
    full = m(x, is_causal=True)
    cache = KVCache()
    steps = torch.cat([m(x[i:i + 1], kv_cache=cache) for i in range(N)], dim=0)
    torch.testing.assert_close(steps, full, **TIGHT)


def test_kv_cache_api():
    c = KVCache()
    assert c.length == 0 and c.batch_size is None
    k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 7)
    assert c.append(k, v) == (k, v) and c.length == 4
    k2, v2 = torch.randn(2, 3, 1, 5), torch.randn(2, 3, 1, 7)
    fk, fv = c.append(k2, v2)
    assert c.length == 5 and c.batch_size == 2
    torch.testing.assert_close(fk, torch.cat([k, k2], 2))
    torch.testing.assert_close(fv, torch.cat([v, v2], 2))
    c.reset()
    assert c.length == 0 and c.k is None and c.v is None
    assert KVCache(k, v).length == 4
    with pytest.raises(ValueError, match="both be given or both be None"):
        KVCache(k, None)
    with pytest.raises(ValueError, match=r"k must be 4-D \(B, Hkv, T, D\); got 3-D"):
        c.append(k[0], v)
    with pytest.raises(ValueError, match=r"must agree in \(B, Hkv, T\)"):
        c.append(k, v[:, :, :2])
    c.append(k, v)
    with pytest.raises(ValueError, match=r"k \(2, 2, 1, 5\).*does not continue the cached "
                                         r"\(2, 3, 4, 5\).*Hkv=3"):
        c.append(k2[:, :2], v2[:, :2])
    with pytest.raises(ValueError, match=r"v \(2, 3, 1, 6\).*does not continue"):
        c.append(k2, v2[..., :6])
    with pytest.raises(ValueError, match="does not continue"):
        c.append(k2.double(), v2.double())
    with pytest.raises(TypeError, match="k must be a torch.Tensor; got list"):
        c.append([1], v2)
    assert c.length == 4  # refused appends changed nothing


def test_decoding_errors():
    m = layer("sdpa", max_seq_len=8)
    x = tokens(n=4)
    cache = KVCache()
    m(x, kv_cache=cache)
    with pytest.raises(ValueError, match=r"key and value must be None"):
        m(x[:, :1], x[:, :1], kv_cache=cache)
    with pytest.raises(ValueError, match=r"key_padding_mask is not supported with a kv_cache"):
        m(x[:, :1], kv_cache=cache, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"query batch size 3 does not match the kv_cache's 2"):
        m(tokens(B=3, n=1), kv_cache=cache)
    with pytest.raises(ValueError, match=r"decoding is causal; got is_causal=False"):
        m(x[:, :1], kv_cache=cache, is_causal=False)
    with pytest.raises(TypeError, match=r"kv_cache must be an attnlab.nn.KVCache, an "
                                        r"attnlab.nn.StateCache or None; got dict"):
        m(x[:, :1], kv_cache={})
    with pytest.raises(ValueError, match=r"sequence length 9 exceeds max_seq_len=8"):
        m(tokens(n=5), kv_cache=cache)  # T + Nnew = 4 + 5
    with pytest.raises(ValueError, match=r"attn_mask must be broadcastable to .*\(2, 4, 1, 5\)"):
        m(x[:, :1], kv_cache=cache, attn_mask=torch.ones(1, 4, dtype=torch.bool))
    assert cache.length == 4  # every refused call left the cache as it was
    m(x[:, :1], kv_cache=cache)
    assert cache.length == 5
    # A cache from a layer with other key/value heads is refused, not silently mixed.
    with pytest.raises(ValueError, match="does not continue the cached"):
        layer("sdpa", num_kv_heads=4)(x[:, :1], kv_cache=cache)


@pytest.mark.parametrize("name", ["linformer", "synthesizer_random", "bigbird"])
def test_mechanism_without_kv_cache_is_refused_with_the_list(name):
    m = MultiheadAttention(E, H, name, max_seq_len=16)
    with pytest.raises(ValueError, match=rf"mechanism '{name}' cannot decode with a kv_cache.*"
                                         rf"use one of \['additive', 'differential', 'dot'"):
        m(tokens(n=2).float(), kv_cache=KVCache())


def test_registering_kv_cache_needs_causal_cross_attention():
    with pytest.raises(ValueError, match=r"kv_cache=True needs causal=True and cross=True.*"
                                         r"got causal=True, cross=False"):
        register_mechanism("test_bad_cache", family="x", paper=Paper("t", "a", 2000),
                           time="O(N)", memory="O(N)", equation="-", exact=True, causal=True,
                           arbitrary_mask=True, cross=False, returns_weights=False,
                           kv_cache=True)
    assert "test_bad_cache" not in attnlab.list_mechanisms()
