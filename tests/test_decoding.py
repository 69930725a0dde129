"""Decoding with a bounded state (registry flag ``decode_state``): for every such
mechanism, ``MultiheadAttention`` fed one token (or any chunks) at a time through a
``StateCache`` equals the same layer's full causal forward, and the state does not grow.

The reference is the layer run once, causally, on the whole sequence: the decoding path
(``Mechanism.decode``) shares no code with it but the projections.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.mechanisms.base import Mechanism
from attnlab.models.lm import DecoderLM
from attnlab.nn import KVCache, MultiheadAttention, StateCache, new_cache
from attnlab.nn.cache import state_nbytes
from attnlab.registry import create_for

E, H, N = 16, 4, 24
TIGHT = dict(atol=1e-10, rtol=1e-8)
DECODE = attnlab.list_mechanisms(decode_state=True)


def layer(name, positions=None, num_kv_heads=None, seed=0):
    torch.manual_seed(seed)
    spec = attnlab.get(name)
    m = MultiheadAttention(E, H, name, num_kv_heads=num_kv_heads, positions=positions,
                           is_causal=True, max_seq_len=4 * N, **spec.tiny_hparams)
    with torch.no_grad():
        for p in m.parameters():  # non-zero biases and gates away from their init
            p.add_(0.2 * torch.randn_like(p))
    return m.double().eval()


def tokens(B=2, n=N, seed=1):
    return torch.randn(B, n, E, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def decode(m, x, sizes):
    cache = m.new_cache()
    assert isinstance(cache, StateCache)
    outs, t = [], 0
    for s in sizes:
        outs.append(m(x[:, t:t + s], kv_cache=cache))
        t += s
    assert t == x.shape[1] and cache.length == t
    return torch.cat(outs, dim=1), cache


def test_decode_state_flags_are_consistent():
    assert DECODE, "no mechanism decodes with a state"
    for name in attnlab.list_mechanisms():
        s = attnlab.get(name)
        assert s.to_dict()["decode_state"] is s.decode_state
        assert not (s.decode_state and s.kv_cache)
        if s.decode_state:  # the flag promises an implementation of its own
            assert s.causal and s.cls._decode is not Mechanism._decode, name


@pytest.mark.parametrize("positions", [None, "rope"])
@pytest.mark.parametrize("name", DECODE)
def test_token_by_token_equals_the_full_causal_forward(name, positions):
    m = layer(name, positions)
    x = tokens()
    full = m(x, is_causal=True)
    for sizes in ([1] * N, [7, 1, 1, 15], [N]):
        out, _ = decode(m, x, sizes)
        torch.testing.assert_close(out, full, **TIGHT, msg=f"{name} {sizes}")


@pytest.mark.parametrize("name", DECODE)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_any_chunking_equals_the_full_causal_forward(name, data):
    sizes, left = [], N
    while left:
        s = data.draw(st.integers(1, left))
        sizes.append(s)
        left -= s
    m = layer(name)
    x = tokens(B=1, seed=data.draw(st.integers(0, 2**16)))
    out, _ = decode(m, x, sizes)
    torch.testing.assert_close(out, m(x, is_causal=True), **TIGHT)


@pytest.mark.parametrize("name", DECODE)
def test_the_state_does_not_grow_with_the_sequence(name):
    m = layer(name)
    x = tokens(B=1, n=3 * N)
    cache = m.new_cache()
    sizes = {}
    for t in range(3 * N):
        m(x[:, t:t + 1], kv_cache=cache)
        sizes[t + 1] = state_nbytes(cache.state)
    assert sizes[N] == sizes[3 * N] > 0, f"{name}: state bytes {sizes[N]} -> {sizes[3 * N]}"


@pytest.mark.parametrize("name", DECODE[:1])
def test_grouped_query_heads_decode(name):
    m = layer(name, num_kv_heads=2)
    x = tokens()
    out, _ = decode(m, x, [5, 1, 1, 17])
    torch.testing.assert_close(out, m(x, is_causal=True), **TIGHT)


def test_the_wrong_cache_or_a_mask_is_refused_by_name():
    name = DECODE[0]
    m, x = layer(name), tokens()
    with pytest.raises(TypeError, match="StateCache"):
        m(x, kv_cache=KVCache())
    with pytest.raises(TypeError, match="KVCache"):
        layer("sdpa")(x, kv_cache=StateCache())
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, kv_cache=m.new_cache(), attn_mask=torch.ones(N, N, dtype=torch.bool))
    with pytest.raises(ValueError, match="need_weights"):
        m(x, kv_cache=m.new_cache(), need_weights=True)
    with pytest.raises(ValueError, match="decode incrementally"):
        new_cache(attnlab.get("linformer"))
    cache = m.new_cache()
    with pytest.raises(ValueError, match="attn_mask"):  # a refused call leaves the cache
        m(x, kv_cache=cache, attn_mask=torch.ones(N, N, dtype=torch.bool))
    assert cache.length == 0 and cache.state is None


@pytest.mark.parametrize("name", DECODE)
def test_a_foreign_state_is_refused_by_name(name):
    """Every state is checked by one function (engines/decode_state.py): each way a state
    can fail to continue these inputs is refused, naming the key."""
    mech = create_for(name, head_dim=4, num_heads=H, max_seq_len=64,
                      **attnlab.get(name).tiny_hparams).double()
    q, k, v = (torch.randn(2, H, 3, 4, dtype=torch.float64) for _ in range(3))
    _, state = mech.decode(q, k, v)
    key = next(key for key, x in sorted(state.items()) if torch.is_tensor(x)
               and x.is_floating_point())
    bad = [([1], TypeError, "state must be None or the dict"),
           ({key: state[key]}, ValueError, r"state must have the keys"),
           ({**state, "t": -1}, ValueError, r"state\['t'\] must be an int >= 0"),
           ({**state, key: state[key][:1]}, ValueError, r"does not continue these inputs"),
           ({**state, key: state[key].float()}, ValueError, r"torch.float32"),
           ({**state, key: 0.0}, TypeError, rf"state\['{key}'\] must be a torch.Tensor")]
    for st_, exc, pattern in bad:
        with pytest.raises(exc, match=pattern):
            mech.decode(q, k, v, st_)


def test_mechanism_decode_checks_its_inputs():
    mech = create_for(DECODE[0], head_dim=4, num_heads=H, max_seq_len=64,
                      **attnlab.get(DECODE[0]).tiny_hparams)
    q = torch.randn(1, H, 3, 4)
    with pytest.raises(ValueError, match="same new positions"):
        mech.decode(q, q[:, :, :2], q[:, :, :2])
    with pytest.raises(ValueError, match="no decoding state"):
        attnlab.create("sdpa").decode(q, q, q)


@pytest.mark.parametrize("name", DECODE[:3])
def test_language_model_generates_the_same_tokens_with_and_without_the_state(name):
    torch.manual_seed(0)
    lm = DecoderLM(50, mechanism=name, mechanism_kwargs=dict(attnlab.get(name).tiny_hparams),
                   d_model=E, num_heads=H, num_layers=2, max_len=64).eval()
    assert lm.can_cache()
    prompt = torch.randint(1, 50, (2, 9))
    cached = lm.generate(prompt, 12, temperature=0.0, use_cache=True)
    recomputed = lm.generate(prompt, 12, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)
