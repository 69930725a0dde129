"""Decoding kernel attention with its recurrent state: linear, performer, cosformer.

The defining property: ``decode`` over positions ``t .. t+n-1`` continuing a state equals
rows ``t .. t+n-1`` of the full causal forward, in float64 to rounding, however the
sequence is cut (one token at a time, random chunks, a prefill then tokens), while the
state ``S, z`` (and the Performer's running max, cosFormer's position) keeps one size.
Linear and cosFormer are also checked against the RNN form written plainly here
(Katharopoulos et al. eq. 18-20, a Python loop over tokens). The Performer is checked
where its stabilising shift matters: keys whose running max keeps growing, with
``kernel_eps`` = 0 and > 0 (a key's ``+ kernel_eps`` is in units of the max at its own
position).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LargestTensor
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
import attnlab.mechanisms.base as base
import attnlab.mechanisms.kernel  # noqa: F401
from attnlab.nn import MultiheadAttention, StateCache
from attnlab.nn.cache import state_nbytes

B, H, N, D = 2, 3, 29, 4
TIGHT = dict(atol=1e-10, rtol=1e-8)
CASES = {  # (mechanism, hyperparameters): chunk_size 4 so that n > chunk is common
    "linear": ("linear", dict(chunk_size=4)),
    "performer": ("performer", dict(head_dim=D, num_features=16, seed=0, chunk_size=4)),
    "performer_eps0": ("performer", dict(head_dim=D, num_features=16, seed=0, chunk_size=4,
                                         kernel_eps=0.0)),
    "cosformer": ("cosformer", dict(max_seq_len=600, chunk_size=4)),
}
NAMES = ["linear", "performer", "cosformer"]


def mech(case, **hp):
    name, base_hp = CASES[case]
    return attnlab.create(name, **{**base_hp, **hp}).double().eval()


def qkv(n=N, b=B, h=H, seed=0, growing=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, D, generator=g, dtype=torch.float64) for _ in range(3))
    if growing:  # key norms rise along the sequence: the Performer's running max keeps growing
        k = k / k.norm(dim=-1, keepdim=True) * torch.linspace(0.1, 4.0, n,
                                                              dtype=torch.float64)[:, None]
    return q.to(dtype), k.to(dtype), v.to(dtype)


def decode(m, q, k, v, sizes, state=None):
    outs, t = [], 0 if state is None else state["t"]
    t0 = t
    for s in sizes:
        o, state = m.decode(q[:, :, t - t0:t - t0 + s], k[:, :, t - t0:t - t0 + s],
                            v[:, :, t - t0:t - t0 + s], state)
        outs.append(o)
        t += s
        assert state["t"] == t
    return torch.cat(outs, dim=2), state


def test_the_three_decode_with_a_state():
    for name in NAMES:
        spec = attnlab.get(name)
        assert spec.decode_state and spec.causal and not spec.kv_cache, name


# -------------------------------------------------------------- decode == causal forward
@pytest.mark.parametrize("case", list(CASES))
def test_token_by_token_equals_the_full_causal_forward(case):
    m = mech(case)
    q, k, v = qkv(growing=case.startswith("performer"))
    out, _ = decode(m, q, k, v, [1] * N)
    torch.testing.assert_close(out, m(q, k, v, is_causal=True), **TIGHT)


@pytest.mark.parametrize("case", list(CASES))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_any_chunking_equals_the_full_causal_forward(case, data):
    sizes, left = [], N
    while left:
        sizes.append(data.draw(st.integers(1, left)))
        left -= sizes[-1]
    m = mech(case, chunk_size=data.draw(st.integers(1, 9)))
    q, k, v = qkv(seed=data.draw(st.integers(0, 2**16)), growing=data.draw(st.booleans()))
    out, _ = decode(m, q, k, v, sizes)
    torch.testing.assert_close(out, m(q, k, v, is_causal=True), **TIGHT, msg=str(sizes))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("prefill", [1, 4, 13])
def test_a_prefill_then_single_tokens(case, prefill):
    m = mech(case)
    q, k, v = qkv(seed=3)
    out, _ = decode(m, q, k, v, [prefill] + [1] * (N - prefill))
    torch.testing.assert_close(out, m(q, k, v, is_causal=True), **TIGHT)


@pytest.mark.parametrize("kernel_eps", [0.0, 1e-4, 0.5])
def test_performer_follows_a_growing_running_max(kernel_eps):
    """Each key raises the max its features are shifted by: the state is rescaled at every
    step, and a key's kernel_eps term stays in units of the max at its own position."""
    m = mech("performer", kernel_eps=kernel_eps)
    q, k, v = qkv(n=40, growing=True, seed=5)
    full = m(q, k, v, is_causal=True)
    out, state = decode(m, q, k, v, [1] * 40)
    torch.testing.assert_close(out, full, **TIGHT)
    _, first = m.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1])
    assert (state["log_scale"] - first["log_scale"]).min() > 1.0  # it did grow, by e^1+
    out, _ = decode(m, q, k, v, [3, 17, 1, 19])
    torch.testing.assert_close(out, full, **TIGHT)


# ------------------------------------------------------ an independent recurrent reference
def rnn_reference(phi_q, phi_k, v, eps):
    """Katharopoulos et al. eq. 18-20, one token at a time: S += phi(k) v^T, z += phi(k)."""
    S = torch.zeros(*phi_k.shape[:2], phi_k.shape[-1], v.shape[-1], dtype=torch.float64)
    z = torch.zeros(*phi_k.shape[:2], phi_k.shape[-1], dtype=torch.float64)
    out = []
    for i in range(phi_q.shape[2]):
        S = S + phi_k[:, :, i, :, None] * v[:, :, i, None, :]
        z = z + phi_k[:, :, i]
        num = (phi_q[:, :, i, :, None] * S).sum(-2)
        out.append(num / (phi_q[:, :, i] * z).sum(-1, keepdim=True).clamp_min(eps))
    return torch.stack(out, dim=2), S, z


def elu1(x):
    return torch.where(x > 0, x + 1.0, torch.exp(x))


def cos_sin(x, M):
    a = math.pi / (2 * M) * torch.arange(x.shape[2], dtype=torch.float64)[:, None]
    return torch.cat([torch.relu(x) * torch.cos(a), torch.relu(x) * torch.sin(a)], dim=-1)


@pytest.mark.parametrize("case", ["linear", "cosformer"])
def test_decode_equals_the_plain_recurrence_and_its_state(case):
    m, scale = mech(case), 0.7
    q, k, v = qkv(seed=7)
    if case == "linear":
        phi_q, phi_k = elu1(q * scale), elu1(k)
    else:
        phi_q, phi_k = cos_sin(q * scale, 600), cos_sin(k, 600)
    want, S, z = rnn_reference(phi_q, phi_k, v, m.hp["eps"])
    state, outs = None, []
    for s in (5, 1, 9, 14):
        t = 0 if state is None else state["t"]
        o, state = m.decode(q[:, :, t:t + s], k[:, :, t:t + s], v[:, :, t:t + s], state,
                            scale=scale)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), want, **TIGHT)
    torch.testing.assert_close(state["S"], S, **TIGHT)
    torch.testing.assert_close(state["z"], z, **TIGHT)


# ----------------------------------------------------------------- the state's promises
@pytest.mark.parametrize("name", NAMES)
def test_the_state_does_not_grow(name):
    m = mech(name)
    q, k, v = qkv(n=512, b=1, seed=2)
    _, at16 = decode(m, q[:, :, :16], k[:, :, :16], v[:, :, :16], [1] * 16)
    _, at512 = decode(m, q[:, :, 16:], k[:, :, 16:], v[:, :, 16:], [300, 195, 1], at16)
    assert at512["t"] == 512
    assert state_nbytes(at16) == state_nbytes(at512) > 0
    assert {key: x.shape for key, x in at16.items() if key != "t"} == \
        {key: x.shape for key, x in at512.items() if key != "t"}


@pytest.mark.parametrize("name", NAMES)
def test_the_state_passed_in_is_never_modified(name):
    m = mech(name)
    q, k, v = qkv(seed=4)
    _, state = m.decode(q[:, :, :6], k[:, :, :6], v[:, :, :6])
    kept = {key: x.clone() if torch.is_tensor(x) else x for key, x in state.items()}
    o1, _ = m.decode(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], state)
    o2, _ = m.decode(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], state)  # the same state again
    for key, x in kept.items():
        assert torch.equal(state[key], x) if torch.is_tensor(x) else state[key] == x, key
    assert torch.equal(o1, o2)


@pytest.mark.parametrize("name", NAMES)
def test_a_long_prefill_builds_no_n_by_n_tensor(name):
    n = 2048
    m = mech(name, chunk_size=64, **({"max_seq_len": n} if name == "cosformer" else {}))
    q, k, v = qkv(n=n, b=1, h=1, seed=6)
    with LargestTensor() as probe:
        out, state = m.decode(q, k, v)
    assert probe.largest < n * n // 16, probe.largest
    torch.testing.assert_close(out, m(q, k, v, is_causal=True), **TIGHT)


@pytest.mark.parametrize("name", NAMES)
def test_a_head_at_a_time_gives_the_same(name, monkeypatch):
    m = mech(name)
    q, k, v = qkv(seed=8)
    want, want_state = decode(m, q, k, v, [10, 1, 18])
    monkeypatch.setattr(base, "SLICE_ELEMENTS", 1)  # one head per slice
    got, state = decode(m, q, k, v, [10, 1, 18])
    torch.testing.assert_close(got, want, **TIGHT)
    for key in want_state:
        torch.testing.assert_close(state[key], want_state[key], **TIGHT)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_a_float32_state(name, dtype):
    m = mech(name).float()
    q, k, v = qkv(seed=9, dtype=dtype)
    out, state = decode(m, q, k, v, [7, 1, 21])
    assert out.dtype == dtype
    assert all(x.dtype == torch.float32 for key, x in state.items() if key != "t")
    torch.testing.assert_close(out, m(q, k, v, is_causal=True), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", NAMES)
def test_grouped_query_heads(name):
    m = mech(name)
    q, _, _ = qkv(h=4, seed=10)
    _, k, v = qkv(h=2, seed=11)
    full = m(q, k, v, is_causal=True, enable_gqa=True)
    state, outs = None, []
    for t0, t1 in ((0, 9), (9, 10), (10, N)):
        o, state = m.decode(q[:, :, t0:t1], k[:, :, t0:t1], v[:, :, t0:t1], state,
                            enable_gqa=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), full, **TIGHT)


# ------------------------------------------------------------------ through the layer
@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_multihead_attention_decodes_with_a_state_cache(name, gqa):
    torch.manual_seed(0)
    E, heads = 16, 4
    hp = {k: x for k, x in CASES[name][1].items() if k not in ("head_dim", "max_seq_len")}
    layer = MultiheadAttention(E, heads, mechanism=name, is_causal=True, max_seq_len=64,
                               num_kv_heads=2 if gqa else None, **hp)
    layer = layer.double().eval()
    x = torch.randn(2, N, E, dtype=torch.float64)
    full = layer(x)
    cache = layer.new_cache()
    assert isinstance(cache, StateCache)
    outs, t = [], 0
    for s in (6, 1, 1, 21):
        outs.append(layer(x[:, t:t + s], kv_cache=cache))
        t += s
    assert cache.length == N
    torch.testing.assert_close(torch.cat(outs, 1), full, **TIGHT)


# ----------------------------------------------------------------------------- errors
def test_cosformer_needs_max_seq_len_to_decode():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"cosformer\.decode: needs max_seq_len"):
        attnlab.create("cosformer").decode(q, k, v)
    m = mech("cosformer", max_seq_len=N)
    _, state = m.decode(q, k, v)
    with pytest.raises(ValueError, match=rf"positions {N}..{N} exceed max_seq_len={N}"):
        m.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)


def test_performer_refuses_to_decode_while_redrawing_features():
    m = mech("performer", redraw=True)
    q, k, v = qkv()
    m.decode(q, k, v)  # eval mode: the features stay
    with pytest.raises(ValueError, match=r"redraw=True in training mode"):
        m.train().decode(q, k, v)


@pytest.mark.parametrize("bad, match", [
    (lambda s: [s], r"state must be None or the dict"),
    (lambda s: {**s, "extra": 1}, r"state must have the keys"),
    (lambda s: {**s, "t": -1}, r"state\['t'\] must be an int >= 0"),
    (lambda s: {**s, "S": s["S"][:1]}, r"state\['S'\] .* does not continue these inputs"),
    (lambda s: {**s, "z": s["z"].float()}, r"state\['z'\] .* torch.float32"),
    (lambda s: {**s, "log_scale": "x"}, r"state\['log_scale'\] must be a torch.Tensor"),
])
def test_a_bad_state_is_refused_by_name(bad, match):
    m = mech("performer")
    q, k, v = qkv()
    _, state = m.decode(q, k, v)
    with pytest.raises((TypeError, ValueError), match=match):
        m.decode(q, k, v, bad(state))


def test_a_state_of_another_mechanism_is_refused():
    q, k, v = qkv()
    _, state = mech("performer").decode(q, k, v)  # F = 16 features and a running max
    with pytest.raises(ValueError, match=r"linear\.decode: state must have the keys"):
        mech("linear").decode(q, k, v, state)
