"""Decoding the causal windowed mechanisms with a rolling buffer (window_decode engine).

The defining property: ``decode`` over positions ``t .. t+n-1`` continuing a state equals
rows ``t .. t+n-1`` of the full causal forward, in float64 to rounding, however the
sequence is cut (token by token, random chunks, chunked queries inside one call), while
the state holds exactly the last ``W - 1`` keys and values (plus longformer's first
positions) and so keeps one size. Windows are small against ``N = 40`` so the state truly
drops keys. The decoded rows are also checked against dense float64 formulas of each
pattern written here from the papers (not through the forwards), and the layer
(``MultiheadAttention`` with its ``StateCache``) and a language model's generation against
their recomputed causal forward.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from conftest import LargestTensor
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
import attnlab.mechanisms.adaptive  # noqa: F401
import attnlab.mechanisms.convolution  # noqa: F401
import attnlab.mechanisms.sparse  # noqa: F401
from attnlab.mechanisms._engines import window_decode
from attnlab.models.lm import DecoderLM
from attnlab.nn import MultiheadAttention, StateCache
from attnlab.nn.cache import state_nbytes

B, H, N, D = 2, 3, 40, 5
TIGHT = dict(atol=1e-10, rtol=1e-8)
G = (0, 3, 17)
# name -> (hyperparameters, span W, pinned P): the state holds P + W - 1 slots.
CASES = {
    "sliding_window": (dict(window=8, block_size=4), 8, 0),
    "local": (dict(block_size=8), 8, 0),
    "dilated_window": (dict(window=4, dilation=3, block_size=4), 10, 0),
    "longformer": (dict(window=8, block_size=4, global_tokens=G), 5, 18),
    "adaptive_span": (dict(num_heads=H, max_span=10, ramp=3, block_size=4), 10, 0),
    "lightweight_conv": (dict(num_heads=H, kernel_size=5), 5, 0),
    "dynamic_conv": (dict(num_heads=H, kernel_size=6, head_dim=D), 6, 0),
}
NAMES = list(CASES)
NOT_DECODED = ["bigbird", "sparse_transformer", "block_sparse"]


def mech(name, seed=0):
    torch.manual_seed(seed)
    m = attnlab.create(name, **CASES[name][0]).double().eval()
    with torch.no_grad():
        if name == "adaptive_span":  # spans 1, 6 and 10 tokens: one per head, one = max_span
            m.span_frac.copy_(torch.tensor([0.1, 0.6, 1.0]))
        else:  # the kernels away from their initialisation
            for p in m.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return m


def qkv(n=N, b=B, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, H, n, D, generator=g, dtype=torch.float64).to(dtype)
                 for _ in range(3))


def decode(m, q, k, v, sizes, state=None):
    outs, t = [], 0
    for s in sizes:
        o, state = m.decode(q[:, :, t:t + s], k[:, :, t:t + s], v[:, :, t:t + s], state)
        outs.append(o)
        t += s
        assert state["t"] == t
    return torch.cat(outs, dim=2), state


# ---------------------------------------------------------------- dense references
def dense_reference(name, m, q, k, v):
    """The causal rows written densely from each paper's definition, in float64."""
    n, hp = q.shape[2], m.hp
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    x = i - j  # distance; causal: x >= 0
    if name in ("lightweight_conv", "dynamic_conv"):
        taps = hp["kernel_size"]
        if name == "lightweight_conv":
            w = torch.softmax(m.weight.double(), -1)[None, :, None, :].expand(B, H, n, taps)
        else:
            w = torch.softmax(torch.einsum("bhnc,htc->bhnt", q, m.weight.double()), -1)
        A = torch.zeros(B, H, n, n, dtype=torch.float64)
        for a in range(n):  # tap t reads the token t - (k - 1) back: out_a = sum_t w v_{a-k+1+t}
            for t in range(taps):
                if 0 <= a - taps + 1 + t:
                    A[:, :, a, a - taps + 1 + t] = w[:, :, a, t]
        return A @ v
    s = q @ k.transpose(-1, -2) / D ** 0.5
    if name == "adaptive_span":
        z = (hp["max_span"] * m.span_frac.double().clamp(0, 1)).view(1, -1, 1, 1)
        R = hp["ramp"]
        mz = ((R + z - x) / R).clamp(0, 1) * ((x >= 0) & (x < hp["max_span"]))
        e = torch.exp(s - s.max(-1, keepdim=True).values) * mz
        return (e / e.sum(-1, keepdim=True)) @ v
    if name == "sliding_window":
        ok = (x >= 0) & (x < hp["window"])
    elif name == "local":
        ok = (x >= 0) & (i // hp["block_size"] == j // hp["block_size"])
    elif name == "dilated_window":
        ok = (x >= 0) & (x % hp["dilation"] == 0) & (x // hp["dilation"] < hp["window"])
    else:  # longformer, causal: window |i - j| <= w//2 or a global query or key
        g = torch.zeros(n, dtype=torch.bool)
        g[[t for t in hp["global_tokens"] if t < n]] = True
        ok = (x >= 0) & ((x <= hp["window"] // 2) | g.view(-1, 1) | g.view(1, -1))
    return torch.softmax(s.masked_fill(~ok, float("-inf")), -1) @ v


# ---------------------------------------------------------------- decode == causal forward
def test_the_windows_decode_with_a_state_and_the_unbounded_do_not():
    for name in NAMES:
        s = attnlab.get(name)
        assert s.decode_state and s.causal and not s.kv_cache, name
    for name in NOT_DECODED:  # their causal rows may need every past key
        assert not attnlab.get(name).decode_state, name


@pytest.mark.parametrize("name", NAMES)
def test_token_by_token_equals_the_full_causal_forward_and_the_formula(name):
    m = mech(name)
    q, k, v = qkv()
    full = m(q, k, v, is_causal=True)
    out, _ = decode(m, q, k, v, [1] * N)
    torch.testing.assert_close(out, full, **TIGHT)
    with torch.no_grad():
        torch.testing.assert_close(out, dense_reference(name, m, q, k, v), **TIGHT)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_any_chunking_equals_the_full_causal_forward(name, data):
    sizes, left = [], N
    while left:
        s = data.draw(st.integers(1, left), label="chunk")
        sizes.append(s)
        left -= s
    # Query chunks inside one call down to one row (chunk = max(W, MIN_CHUNK)).
    min_chunk = data.draw(st.integers(1, 12), label="MIN_CHUNK")
    m = mech(name)
    q, k, v = qkv(b=1, seed=data.draw(st.integers(0, 2**16), label="seed"))
    with mock.patch.object(window_decode, "MIN_CHUNK", min_chunk):
        out, _ = decode(m, q, k, v, sizes)
    torch.testing.assert_close(out, m(q, k, v, is_causal=True), **TIGHT)


@pytest.mark.parametrize("name", NAMES)
def test_the_state_holds_exactly_the_keys_the_future_needs(name):
    _, W, P = CASES[name]
    m = mech(name)
    q, k, v = qkv()
    sizes = {}
    state = None
    for t0, t1 in ((0, 1), (1, 5), (5, 23), (23, N)):
        _, state = m.decode(q[:, :, t0:t1], k[:, :, t0:t1], v[:, :, t0:t1], state)
        keep = sorted({*range(min(P, t1)), *range(max(P, t1 - W + 1), t1)})
        pos = state["pos"]
        assert pos.shape == (P + W - 1,)
        assert sorted(pos[pos >= 0].tolist()) == keep, (t1, pos.tolist())
        slots = (pos >= 0).nonzero().flatten()
        torch.testing.assert_close(state["v"][:, :, slots], v[:, :, pos[slots]], rtol=0, atol=0)
        if "k" in state:
            torch.testing.assert_close(state["k"][:, :, slots], k[:, :, pos[slots]],
                                       rtol=0, atol=0)
        else:  # the convolutions read no keys: none kept
            assert name.endswith("_conv")
        sizes[t1] = state_nbytes(state)
    assert len(set(sizes.values())) == 1


@pytest.mark.parametrize("name", NAMES)
def test_the_state_does_not_grow_from_64_to_512_positions(name):
    m = mech(name)
    q, k, v = qkv(n=512, b=1, seed=3)
    _, s64 = decode(m, q[:, :, :64], k[:, :, :64], v[:, :, :64], [60, 1, 1, 1, 1])
    out, s512 = m.decode(q[:, :, 64:], k[:, :, 64:], v[:, :, 64:], s64)
    assert s512["t"] == 512 and state_nbytes(s64) == state_nbytes(s512) > 0
    assert {key: x.shape for key, x in s64.items() if key != "t"} == \
        {key: x.shape for key, x in s512.items() if key != "t"}
    torch.testing.assert_close(out, m(q, k, v, is_causal=True)[:, :, 64:], **TIGHT)


@pytest.mark.parametrize("name", ["sliding_window", "longformer", "dynamic_conv"])
def test_a_long_prefill_never_forms_an_n_by_n_tensor(name):
    m = mech(name)
    n = 2048
    q, k, v = qkv(n=n, b=1, seed=4)
    with torch.no_grad(), LargestTensor() as probe:
        out, state = m.decode(q, k, v)
    assert probe.largest < n * n // 64, probe.largest
    with torch.no_grad():
        torch.testing.assert_close(out, m(q, k, v, is_causal=True), **TIGHT)


@pytest.mark.parametrize("name", NAMES)
def test_the_state_passed_in_is_not_modified(name):
    m = mech(name)
    q, k, v = qkv()
    _, state = decode(m, q, k, v, [2, 1])  # t = 3 < P: longformer's pinned slots still fill
    before = {key: x.clone() if torch.is_tensor(x) else x for key, x in state.items()}
    m.decode(q[:, :, 3:30], k[:, :, 3:30], v[:, :, 3:30], state)
    for key, x in before.items():
        assert torch.equal(state[key], x) if torch.is_tensor(x) else state[key] == x, key


@pytest.mark.parametrize("name", ["adaptive_span", "dynamic_conv", "lightweight_conv"])
def test_parameter_gradients_through_decoding_equal_the_forwards(name):
    m = mech(name)
    q, k, v = qkv(seed=5)
    out, _ = decode(m, q, k, v, [13, 1, 26])
    grads = torch.autograd.grad(out.pow(2).sum(), list(m.parameters()))
    want = torch.autograd.grad(m(q, k, v, is_causal=True).pow(2).sum(), list(m.parameters()))
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, **TIGHT)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["sliding_window", "adaptive_span", "dynamic_conv"])
def test_half_precision_keeps_a_float32_state(name, dtype):
    m = mech(name).float()
    q, k, v = qkv(dtype=dtype, seed=6)
    out, state = decode(m, q, k, v, [9, 1, 1, 29])
    assert out.dtype == dtype
    assert all(x.dtype in (torch.float32, torch.int64) for key, x in state.items() if key != "t")
    want = m.double()(q.double(), k.double(), v.double(), is_causal=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


# ---------------------------------------------------------------- errors
def test_longformer_with_globals_from_the_end_is_refused_by_name():
    m = attnlab.create("longformer", window=4, block_size=4, global_tokens=(0, -1))
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="global_tokens.*count from the end"):
        m.decode(q, q, q)


def test_a_state_that_does_not_continue_the_inputs_is_refused():
    m = mech("sliding_window")
    q, k, v = qkv()
    _, state = m.decode(q[:, :, :4], k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match=r"state\['k'\].*does not continue"):
        m.decode(q[:1, :, 4:5], k[:1, :, 4:5], v[:1, :, 4:5], state)  # another batch
    with pytest.raises(ValueError, match=r"state\['v'\].*float32.*does not continue"):
        m.decode(q[:, :, 4:5], k[:, :, 4:5], v[:, :, 4:5], {**state, "v": state["v"].float()})
    with pytest.raises(ValueError, match="keys"):
        mech("lightweight_conv").decode(q[:, :, 4:5], k[:, :, 4:5], v[:, :, 4:5], state)
    with pytest.raises(ValueError, match=r"state\['t'\]"):
        m.decode(q[:, :, 4:5], k[:, :, 4:5], v[:, :, 4:5], {**state, "t": -1})
    with pytest.raises(TypeError, match="state must be None or the dict"):
        m.decode(q[:, :, 4:5], k[:, :, 4:5], v[:, :, 4:5], [state])


# ---------------------------------------------------------------- the layer and a model
E = 12


def mha(name, positions=None):
    torch.manual_seed(1)
    hp = {key: x for key, x in CASES[name][0].items() if key not in ("num_heads", "head_dim")}
    layer = MultiheadAttention(E, H, name, is_causal=True, positions=positions,
                               max_seq_len=64, **hp)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
        if name == "adaptive_span":
            layer.attn.span_frac.copy_(torch.tensor([0.1, 0.6, 1.0]))
    return layer.double().eval()


@pytest.mark.parametrize("positions", [None, "rope"])
@pytest.mark.parametrize("name", NAMES)
def test_the_layer_decodes_with_its_state_cache(name, positions):
    layer = mha(name, positions)
    x = torch.randn(2, N, E, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full = layer(x, is_causal=True)
    sizes = [1] * N if positions else [7, 1, 1, 31]  # RoPE: every absolute position alone
    cache, outs, t = layer.new_cache(), [], 0
    assert isinstance(cache, StateCache)
    for s in sizes:
        outs.append(layer(x[:, t:t + s], kv_cache=cache))
        t += s
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TIGHT)
    assert cache.length == N and cache.nbytes == state_nbytes(cache.state) > 0


@pytest.mark.parametrize("name", ["local", "lightweight_conv"])
def test_a_language_model_generates_the_same_tokens_with_the_state(name):
    torch.manual_seed(0)
    kw = {key: x for key, x in CASES[name][0].items() if key not in ("num_heads", "head_dim")}
    lm = DecoderLM(50, mechanism=name, mechanism_kwargs=kw, d_model=E, num_heads=H,
                   num_layers=2, max_len=64).eval()
    assert lm.can_cache()
    prompt = torch.randint(1, 50, (2, 11))
    cached = lm.generate(prompt, 20, temperature=0.0, use_cache=True)
    assert torch.equal(cached, lm.generate(prompt, 20, temperature=0.0, use_cache=False))
