"""MultiheadAttention's options around the mechanism: the output gate (Qiu et al. 2025),
convolutional Q/K/V inputs (CvT, Wu et al. 2021), the ``"hybrid:<heads>"`` sugar, the
instance flags a hybrid layer follows, and one mechanism per layer of a stack.

References are written here: the gate's ``Y_h * sigmoid(X W_h + b_h)`` on the ungated
layer's head outputs, the depthwise convolution as a loop over taps, fed to the plain
layer as separate query/key/value streams.
"""

from __future__ import annotations

import pytest
import torch

import attnlab.mechanisms.hybrid  # noqa: F401
from attnlab.models.args import check_mechanism, transformer_args
from attnlab.models.blocks import TransformerStack
from attnlab.nn import KVCache, MultiheadAttention
from attnlab.tasks.common import transformer_kwargs

DT = torch.float64
B, N, E, H = 2, 9, 16, 4
D = E // H
SCHEDULES = [[1] * N, [4, 1, 1, 3], [2, 5, 2]]
EXTRA = {"linear": {"chunk_size": 4}, "sliding_window": {"window": 4, "block_size": 4},
         "linformer": {"k": 4}}


def make(mechanism="sdpa", seed=0, **kw):
    torch.manual_seed(seed)
    m = MultiheadAttention(E, H, mechanism, max_seq_len=32, dtype=DT,
                           **{**EXTRA.get(mechanism, {}), **kw})
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "conv" not in name:  # conv kernels are set by each test
                p.normal_(std=0.4)
    return m.eval()


def twin(m, mechanism="sdpa", **kw):
    """The plain layer with ``m``'s shared weights."""
    plain = make(mechanism, seed=1, **kw)
    plain.load_state_dict({k: v for k, v in m.state_dict().items()
                           if not k.startswith(("gate.", "conv."))})
    return plain


def x_in(b=B, n=N, seed=3):
    return torch.randn(b, n, E, generator=torch.Generator().manual_seed(seed), dtype=DT)


def assert_decodes(m, x, sizes, full) -> KVCache:
    """Feed ``x`` in chunks of ``sizes`` through one cache: the outputs must be ``full``,
    the causal forward's. Returns the cache."""
    cache, outs, t = KVCache(), [], 0
    for s in sizes:
        outs.append(m(x[:, t:t + s], kv_cache=cache))
        t += s
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-12, atol=1e-12)
    return cache


def identity_out(m):
    with torch.no_grad():  # out_proj = I: the output is the concatenated head outputs
        m.out_proj.weight.copy_(torch.eye(E, dtype=DT))
        m.out_proj.bias.zero_()


# ---------------------------------------------------------------- output gate
@pytest.mark.parametrize("mechanism", ["sdpa", "linear", "hybrid:sliding_window*2+sdpa*2"])
def test_a_saturated_open_gate_is_the_ungated_layer(mechanism):
    m = make(mechanism, output_gate=True)
    with torch.no_grad():
        m.gate.proj.weight.zero_()
        m.gate.proj.bias.fill_(40.0)  # sigmoid(40) = 1 in float64 up to 4e-18
    plain = twin(m, mechanism)
    x = x_in()
    for causal in (False, True):
        torch.testing.assert_close(m(x, is_causal=causal), plain(x, is_causal=causal),
                                   rtol=1e-14, atol=1e-14)


def test_the_gate_is_per_head_and_elementwise_from_the_input():
    m = make(output_gate=True, is_causal=True)
    identity_out(m)
    plain = twin(m, is_causal=True)
    x = x_in()
    W, b = m.gate.proj.weight, m.gate.proj.bias
    want = plain(x) * torch.sigmoid(x @ W.T + b)  # channel h*D + j: head h, element j
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # close exactly one (head, element): only that channel dies
        W.zero_()
        b.fill_(40.0)
        b[2 * D + 1] = -1e4
    out, ref = m(x), plain(x)
    assert torch.equal(out[..., 2 * D + 1], torch.zeros(B, N, dtype=DT))
    keep = torch.ones(E, dtype=torch.bool)
    keep[2 * D + 1] = False
    torch.testing.assert_close(out[..., keep], ref[..., keep], rtol=1e-14, atol=1e-14)


def test_gated_decoding_and_weights():
    m = make(output_gate=True)
    x = x_in()
    full = m(x, is_causal=True)
    for sizes in SCHEDULES:
        assert_decodes(m, x, sizes, full)
    _, w = m(x, need_weights=True)  # the weights are the mechanism's, before the gate
    torch.testing.assert_close(w, twin(m)(x, need_weights=True)[1], rtol=0, atol=0)


# ---------------------------------------------------------------- convolutional inputs
def conv_loop(x, w, causal):
    """Depthwise convolution along the length, tap by tap: ``w`` ``(C, 1, k)``."""
    k, n = w.shape[-1], x.shape[1]
    left = k - 1 if causal else (k - 1) // 2
    out = torch.zeros_like(x)
    for i in range(n):
        for t in range(k):
            j = i - left + t
            if 0 <= j < n:
                out[:, i] += w[:, 0, t] * x[:, j]
    return out


def set_kernels(m, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in (m.conv.q_conv, m.conv.k_conv, m.conv.v_conv):
            c.weight.copy_(torch.randn(c.weight.shape, generator=g, dtype=DT))


@pytest.mark.parametrize("mechanism", ["sdpa", "linear", "sliding_window"])
def test_a_one_tap_kernel_of_ones_is_the_plain_layer(mechanism):
    m = make(mechanism, conv_kernel_size=1)
    with torch.no_grad():
        for c in (m.conv.q_conv, m.conv.k_conv, m.conv.v_conv):
            c.weight.fill_(1.0)
    plain = twin(m, mechanism)
    x = x_in()
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[0, 6:] = True
    for causal in (False, True):
        for kpm in (None, pad):
            got = m(x, is_causal=causal, key_padding_mask=kpm)
            want = plain(x, is_causal=causal, key_padding_mask=kpm)
            if kpm is not None:  # padded queries are zeroed before the convolution: their
                got, want = got[~kpm], want[~kpm]  # outputs differ, the real ones may not
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("mechanism,causal", [("sdpa", False), ("sdpa", True),
                                              ("linformer", False), ("linear", True)])
def test_the_convolution_is_depthwise_along_the_sequence(mechanism, causal, k):
    m = make(mechanism, conv_kernel_size=k)
    set_kernels(m)
    plain = twin(m, mechanism)
    x = x_in()
    c = m.conv
    streams = [conv_loop(x, conv.weight, causal) for conv in (c.q_conv, c.k_conv, c.v_conv)]
    torch.testing.assert_close(m(x, is_causal=causal), plain(*streams, is_causal=causal),
                               rtol=1e-12, atol=1e-12)


def test_a_causal_convolution_never_looks_ahead():
    x = x_in()
    y = x.clone()
    y[:, 5] += 3.0  # change token 5 only
    for k in (2, 3, 5):
        m = make(conv_kernel_size=k, is_causal=True)
        set_kernels(m)
        a, b = m(x), m(y)
        torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
        assert (a[:, 5:] - b[:, 5:]).abs().amax(-1).min() > 1e-6
        centred = m(x, is_causal=False) - m(y, is_causal=False)  # the test can fail
        assert centred[:, 4].abs().max() > 1e-6


def test_padding_never_leaks_through_the_convolution():
    m = make(conv_kernel_size=3)
    set_kernels(m)
    alone = x_in(b=1, n=6)
    for left in (False, True):
        batch = x_in(b=1, n=N, seed=9)  # padding rows hold noise
        real = slice(N - 6, N) if left else slice(0, 6)
        batch[:, real] = alone
        pad = torch.ones(1, N, dtype=torch.bool)
        pad[:, real] = False
        got = m(batch, key_padding_mask=pad)[:, real]
        torch.testing.assert_close(got, m(alone), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mechanism", ["sdpa", "hybrid:reference*2+sdpa*2"])
def test_convolution_decodes_with_the_cache(mechanism):
    m = make(mechanism, conv_kernel_size=3, positions="rope")
    set_kernels(m)
    x = x_in()
    full = m(x, is_causal=True)
    for sizes in SCHEDULES:
        cache = assert_decodes(m, x, sizes, full)
        cache.reset()  # a new sequence starts from zeros, not the old tail
        torch.testing.assert_close(m(x[:, :4], kv_cache=cache), full[:, :4], rtol=1e-12,
                                   atol=1e-12)


def test_a_cache_without_the_convolutions_history_is_refused():
    m, other = make(conv_kernel_size=3), make()
    cache = KVCache()
    other(x_in()[:, :3], kv_cache=cache)  # filled by a layer without convolutions
    with pytest.raises(ValueError, match=r"conv_kernel_size=3 decodes with the last 2 inputs "
                                         r"kept on the kv_cache, but this cache holds none"):
        m(x_in()[:, 3:4], kv_cache=cache)
    assert cache.length == 3


# ---------------------------------------------------------------- hybrid through the layer
def test_hybrid_sugar_is_the_explicit_hybrid():
    a = make("hybrid:sliding_window(window=4, block_size=4)*2+sdpa*2")
    b = make("hybrid", heads="sliding_window(window=4, block_size=4)*2+sdpa*2")
    assert a.spec.name == "hybrid" and a.attn.counts == (2, 2)
    assert a.attn.hp == b.attn.hp
    x = x_in()
    for causal in (False, True):
        torch.testing.assert_close(a(x, is_causal=causal), b(x, is_causal=causal),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"gives heads, and so does heads='sdpa\*4'"):
        make("hybrid:sdpa*4", heads="sdpa*4")
    with pytest.raises(ValueError, match=r"only 'hybrid:<heads>' takes a ':'"):
        make("local:sdpa*4")
    with pytest.raises(ValueError, match=r"hybrid: heads 'sdpa\*3': the counts sum to 3, "
                                         r"but num_heads=4"):
        make("hybrid:sdpa*3")


def test_the_layer_follows_the_hybrid_instance_flags():
    m = make("hybrid:local(block_size=4)*2+linear(chunk_size=4)*2")
    assert not m.spec.arbitrary_mask and m.spec.key_padding and not m.spec.kv_cache
    x = x_in()
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, 7:] = True
    out, w = m(x, key_padding_mask=pad, need_weights=True)  # effective weights: out = A v
    assert w.shape == (B, H, N, N) and torch.equal(w[1, ..., 7:], torch.zeros(H, N, 2,
                                                                               dtype=DT))
    with pytest.raises(ValueError, match="cannot take arbitrary masks"):
        m(x, attn_mask=torch.ones(N, N, dtype=torch.bool))
    with pytest.raises(ValueError, match="cannot decode with a kv_cache"):
        m(x, kv_cache=KVCache())
    with pytest.raises(ValueError, match="has no causal form"):
        make("hybrid:linformer(k=4)*2+sdpa*2", is_causal=True)


def test_bad_options():
    with pytest.raises(TypeError, match=r"output_gate must be a bool"):
        make(output_gate=1)
    with pytest.raises(ValueError, match=r"conv_kernel_size must be >= 1; got 0"):
        make(conv_kernel_size=0)
    with pytest.raises(TypeError, match=r"conv_kernel_size must be an int or None"):
        make(conv_kernel_size=True)
    r = repr(make(output_gate=True, conv_kernel_size=3))
    assert "output_gate=True" in r and "conv_kernel_size=3" in r


# ---------------------------------------------------------------- one mechanism per layer
def stack(layer_mechanisms=None, mechanism="sdpa", mechanism_kwargs=None, seed=0):
    torch.manual_seed(seed)
    return TransformerStack(2, E, H, layer_mechanisms=layer_mechanisms, mechanism=mechanism,
                            mechanism_kwargs=mechanism_kwargs, dropout=0.0, max_len=32).eval()


def args(layer_mechanisms, causal=True, **kw):
    base = dict(mechanism="sdpa", mechanism_kwargs=None, d_model=E, num_heads=H,
                num_layers=2, d_ff=None, dropout=0.0, max_len=32, positions="sinusoidal",
                pad_id=0, vocab={"vocab_size": 10})
    return transformer_args("Model", **{**base, **kw}, causal=causal,
                            layer_mechanisms=layer_mechanisms)


def test_each_layer_runs_its_own_mechanism():
    layers = ["sliding_window(window=4, block_size=4)", "sdpa"]
    mixed, plain = stack(layers), stack()
    assert [type(b.self_attn.attn).__name__ for b in mixed.layers] == ["HybridAttention",
                                                                      "SDPAttention"]
    assert mixed.layers[0].self_attn.attn.parts[0].hp["window"] == 4
    named = stack(["sliding_window", "sdpa"], mechanism="sliding_window",
                  mechanism_kwargs={"window": 4, "block_size": 4})
    assert [b.self_attn.spec.name for b in named.layers] == ["sliding_window", "sdpa"]
    assert named.layers[0].self_attn.attn.hp["window"] == 4  # the main mechanism's kwargs
    for m in (mixed, named):
        m.load_state_dict(plain.state_dict())  # no parameter of their own: the same weights
    x = x_in(n=12).float()
    for causal in (False, True):
        want = plain(x, is_causal=causal)
        for m in (mixed, named):
            assert (m(x, is_causal=causal) - want).abs().max() > 1e-3  # the window shows
            torch.testing.assert_close(m(x[:, :3], is_causal=causal),  # 3 tokens: in it
                                       plain(x[:, :3], is_causal=causal))


def test_layer_mechanisms_are_normalised():
    assert "layer_mechanisms" not in args(None)
    assert args("swa, torch")["layer_mechanisms"] == ["sliding_window", "sdpa"]
    got = args("local*2+sliding_window(window=8, block_size=4)*2,hybrid:sdpa")
    assert got["layer_mechanisms"] == ["hybrid:local*2+sliding_window(window=8, block_size=4)*2",
                                       "hybrid:sdpa"]
    assert args(("local", "sdpa"), causal=False)["layer_mechanisms"] == ["local", "sdpa"]
    assert transformer_kwargs({"layer_mechanisms": "local,sdpa"}, where="t") == {
        "layer_mechanisms": "local,sdpa"}  # a --model-opt the tasks pass on
    assert check_mechanism("M", "mechanism", "hybrid:local*2+sdpa*2", None) == (
        "hybrid", {"heads": "local*2+sdpa*2"})


@pytest.mark.parametrize("value,err,pattern", [
    ("sdpa", ValueError, r"one mechanism per layer \(num_layers=2\); got 1: \['sdpa'\]"),
    (["sdpa"] * 3, ValueError, r"\(num_layers=2\); got 3"),
    (["sdpa", 3], TypeError, r"layer_mechanisms must be a list of mechanism names"),
    ({"a": 1}, TypeError, r"layer_mechanisms must be a list"),
    ("sdpa,slidng_window", ValueError, r"layer_mechanisms\[1\]: mechanism: unknown name "
                                       r"'slidng_window'; did you mean 'sliding_window'"),
    ("sdpa,linformer", ValueError, r"layer_mechanisms\[1\]: 'linformer' has no causal form"),
    ("sdpa,linformer(k=4)*2+sdpa*2", ValueError, r"layer_mechanisms\[1\]: 'hybrid:linformer"
                                                 r"\(k=4\)\*2\+sdpa\*2' has no causal form"),
    ("sdpa,local*3", ValueError, r"layer_mechanisms\[1\]: hybrid: heads 'local\*3': the "
                                 r"counts sum to 3, but num_heads=4"),
    ("sdpa,local:sdpa*4", ValueError, r"only 'hybrid:<heads>' takes a ':'"),
])
def test_bad_layer_mechanisms(value, err, pattern):
    with pytest.raises(err, match=r"Model: .*" + pattern):
        args(value)


def test_a_hybrid_model_mechanism_is_checked_part_by_part():
    with pytest.raises(ValueError, match=r"'hybrid:linformer\(k=4\)\*2\+sdpa\*2' has no "
                                         r"causal form"):
        args(None, mechanism="hybrid", mechanism_kwargs={"heads": "linformer(k=4)*2+sdpa*2"})
    assert args(None, causal=False, mechanism="hybrid",
                mechanism_kwargs={"heads": "linformer(k=4)*2+sdpa*2"})["mechanism"] == "hybrid"
    with pytest.raises(ValueError, match=r"TransformerStack: layer_mechanisms must hold one "
                                         r"mechanism per layer \(2\); got 1"):
        stack(["sdpa"])
