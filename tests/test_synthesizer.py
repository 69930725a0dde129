"""Synthesizer (dense, random, factorized random) against naive float64 definitions written
here from the modules' own weights: outputs, gradients, masks, causality and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab

NAMES = ["synthesizer_dense", "synthesizer_random", "synthesizer_factorized_random"]


def make(name, D=4, H=2, L=16, dtype=torch.float32, **hp):
    torch.manual_seed(99)
    return attnlab.create_for(name, head_dim=D, num_heads=H, max_seq_len=L, **hp).to(dtype)


def rand_qkv(B, H, Nq, Nk, D, Dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for n, d in ((Nq, D), (Nk, D), (Nk, Dv))]


def make_mask(kind, B, Nq, Nk, dtype, seed):
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "none":
        return None
    if kind == "bool":
        return torch.rand(B, 1, Nq, Nk, generator=g) < 0.7
    if kind == "keypad":
        return torch.rand(B, 1, 1, Nk, generator=g) < 0.7
    m = torch.where(torch.rand(Nq, Nk, generator=g) < 0.7, 0.0, float("-inf"))
    return (m + 0.3 * torch.randn(Nq, Nk, generator=g)).to(dtype)


def naive_softmax_apply(logits, v, mask, causal, scale):
    """Explicit exp / sum over (B, H) loops in float64; fully masked rows are zeros."""
    B, H, Nk = v.shape[0], v.shape[1], v.shape[2]
    Nq = logits.shape[-2]
    logits = logits.double().expand(B, H, Nq, Nk)
    allowed = torch.ones(B, H, Nq, Nk, dtype=torch.bool)
    bias = torch.zeros(B, H, Nq, Nk, dtype=torch.float64)
    if mask is not None:
        m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(B, H, Nq, Nk)
        if m.dtype == torch.bool:
            allowed = allowed & m
        else:
            bias = m.double().masked_fill(torch.isneginf(m), 0.0)
            allowed = allowed & ~torch.isneginf(m)
    if causal:
        allowed = allowed & torch.ones(Nq, Nk, dtype=torch.bool).tril()
    outs, ws = [], []
    for b in range(B):
        for h in range(H):
            s = (logits[b, h] * scale + bias[b, h]).masked_fill(~allowed[b, h], float("-inf"))
            mx = s.max(-1, keepdim=True).values
            e = torch.exp(s - torch.where(torch.isneginf(mx), 0.0, mx))
            z = e.sum(-1, keepdim=True)
            p = torch.where(z > 0, e / torch.where(z > 0, z, 1.0), 0.0)
            ws.append(p)
            outs.append(p @ v[b, h].double())
    return (torch.stack(outs).view(B, H, Nq, -1), torch.stack(ws).view(B, H, Nq, Nk))


def naive_dense(mech, q, v, mask, causal, scale):
    """B_i = W_2 relu(W_1 q_i + b_1) + b_2, one query at a time, from the module's weights."""
    W_1, b_1, W_2, b_2 = (p.double() for p in (mech.W_1, mech.b_1, mech.W_2, mech.b_2))
    Nk = v.shape[2]
    qd = q.double()
    rows = [W_2 @ torch.relu(W_1 @ qd[..., i, :].unsqueeze(-1) + b_1.unsqueeze(-1))
            + b_2.unsqueeze(-1) for i in range(q.shape[2])]          # each (B, H, L, 1)
    logits = torch.cat(rows, dim=-1).transpose(-1, -2)[..., :Nk]  # (B, H, Nq, Nk)
    return naive_softmax_apply(logits, v, mask, causal, scale)


def naive_random(mech, Nq, v, mask, causal, scale):
    if hasattr(mech, "R"):
        R = mech.R.double()
    else:
        R = torch.einsum("hlk,hmk->hlm", mech.R_1.double(), mech.R_2.double())
    return naive_softmax_apply(R[:, :Nq, : v.shape[2]].unsqueeze(0), v, mask, causal, scale)


def weighted_grads(out, ins, seed=5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad((out * w).sum(), ins)


# ---------------------------------------------------------------- registry

@pytest.mark.parametrize("name", NAMES)
def test_registered_flags(name):
    s = attnlab.get(name)
    assert s.family == "synthesizer" and s.learnable and s.exact
    assert s.causal and s.arbitrary_mask and s.cross and s.returns_weights
    assert s.time.startswith("O(N^2") and s.memory == "O(N^2)"  # honest: not sub-quadratic
    assert "2005.00743" in s.paper.url


# ---------------------------------------------------------------- against naive float64

shapes = st.fixed_dictionaries({
    "B": st.integers(1, 2), "H": st.integers(1, 3), "Nq": st.integers(1, 9),
    "Nk": st.integers(1, 9), "D": st.integers(1, 5), "Dv": st.integers(1, 4),
})


@settings(max_examples=25)
@given(sh=shapes, kind=st.sampled_from(["none", "bool", "float", "keypad"]),
       causal=st.booleans(), scale=st.sampled_from([None, 0.5]), hidden=st.sampled_from([None, 3]),
       seed=st.integers(0, 1000))
def test_dense_equals_naive_outputs_and_grads(sh, kind, causal, scale, hidden, seed):
    mech = make("synthesizer_dense", D=sh["D"], L=10, hidden=hidden)
    q, k, v = rand_qkv(sh["B"], sh["H"], sh["Nq"], sh["Nk"], sh["D"], sh["Dv"], seed=seed)
    mask = make_mask(kind, sh["B"], sh["Nq"], sh["Nk"], torch.float32, seed)
    out, w = mech(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, need_weights=True)
    ref, ref_w = naive_dense(mech, q, v, mask, causal, 1.0 if scale is None else scale)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(w.double(), ref_w, rtol=0, atol=1e-6)
    params = [mech.W_1, mech.b_1, mech.W_2, mech.b_2]
    got = weighted_grads(out, [q, v, *params])
    want = weighted_grads(ref, [q, v, *params])
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=0, atol=1e-5)
    assert k.grad is None and torch.autograd.grad(out.sum(), k)[0].abs().max() == 0


@settings(max_examples=25)
@given(sh=shapes, kind=st.sampled_from(["none", "bool", "float", "keypad"]),
       causal=st.booleans(), per_head=st.booleans(), seed=st.integers(0, 1000),
       name=st.sampled_from(NAMES[1:]))
def test_random_equals_softmax_R_V(sh, kind, causal, per_head, seed, name):
    mech = make(name, H=sh["H"], L=10, per_head=per_head)
    q, k, v = rand_qkv(sh["B"], sh["H"], sh["Nq"], sh["Nk"], sh["D"], sh["Dv"], seed=seed)
    mask = make_mask(kind, sh["B"], sh["Nq"], sh["Nk"], torch.float32, seed)
    out, w = mech(q, k, v, attn_mask=mask, is_causal=causal, need_weights=True)
    ref, ref_w = naive_random(mech, sh["Nq"], v, mask, causal, 1.0)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(w.double(), ref_w, rtol=0, atol=1e-6)
    params = list(mech.parameters())
    got = weighted_grads(out, [v, *params])
    want = weighted_grads(ref, [v, *params])
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=0, atol=1e-5)
    gq, gk = torch.autograd.grad(out.sum(), (q, k))  # input independent: exact zeros
    assert gq.abs().max() == 0 and gk.abs().max() == 0


def test_random_is_input_independent_and_shared_without_per_head():
    mech = make("synthesizer_random", H=3, L=8, per_head=False)
    assert mech.R.shape == (1, 8, 8)
    q, k, v = (t.detach() for t in rand_qkv(1, 3, 6, 6, 4, 4))
    _, w1 = mech(q, k, v, need_weights=True)
    _, w2 = mech(q * 7 + 1, -k, v, need_weights=True)
    torch.testing.assert_close(w1, w2, rtol=0, atol=0)
    torch.testing.assert_close(w1[:, 0], w1[:, 2], rtol=0, atol=0)  # shared by every head
    torch.testing.assert_close(w1[0, 0], torch.softmax(mech.R[0, :6, :6], -1))


def test_fixed_random_has_no_parameters_and_R_is_a_buffer():
    mech = make("synthesizer_random", H=2, L=8, trainable=False)
    assert list(mech.parameters()) == [] and "R" in dict(mech.named_buffers())
    fact = make("synthesizer_factorized_random", H=2, L=8, trainable=False, rank=3)
    assert list(fact.parameters()) == [] and fact.R_1.shape == (2, 8, 3)


def test_grads_reach_every_parameter():
    q, k, v = rand_qkv(2, 2, 7, 7, 4, 3)
    for name in NAMES:
        mech = make(name, D=4, H=2, L=9)
        mech(q, k, v, is_causal=True).pow(2).sum().backward()
        for pname, p in mech.named_parameters():
            assert p.grad is not None and p.grad.abs().max() > 0, (name, pname)


# ---------------------------------------------------------------- masks and causality

@pytest.mark.parametrize("name", NAMES)
def test_fully_masked_rows_give_zeros(name):
    mech = make(name, D=4, H=2, L=16)
    q, k, v = rand_qkv(2, 2, 8, 8, 4, 4)
    allowed = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    allowed[0, 0, 3] = False
    allowed[1, 0, 5, :6] = False  # with is_causal, keys 6.. are future: row 5 is dead
    out, w = mech(q, k, v, attn_mask=allowed, is_causal=True, need_weights=True)
    assert out[0, :, 3].abs().max() == 0 and out[1, :, 5].abs().max() == 0
    assert w[0, :, 3].abs().max() == 0 and w[1, :, 5].abs().max() == 0
    out.pow(2).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert q.grad[0, :, 3].abs().max() == 0 and q.grad[1, :, 5].abs().max() == 0
    assert all(torch.isfinite(p.grad).all() for p in mech.parameters())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("t0", [0, 4])
def test_causal_future_tokens_do_not_change_the_past(name, t0):
    mech = make(name, D=4, H=2, L=12)
    q, k, v = (t.detach() for t in rand_qkv(1, 2, 10, 10, 4, 4, seed=3))
    out = mech(q, k, v, is_causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):  # for the random synthesizers only v can matter
        t[:, :, t0 + 1:] = torch.randn_like(t[:, :, t0 + 1:]) * 5
    out2 = mech(q2, k2, v2, is_causal=True)
    torch.testing.assert_close(out2[:, :, : t0 + 1], out[:, :, : t0 + 1], rtol=0, atol=1e-6)
    assert (out2[:, :, t0 + 1:] - out[:, :, t0 + 1:]).abs().max() > 1e-3  # could fail


# ---------------------------------------------------------------- errors

def test_length_beyond_max_seq_len_is_a_clear_error():
    q, k, v = (t.detach() for t in rand_qkv(1, 2, 5, 12, 4, 4))
    with pytest.raises(ValueError, match=r"synthesizer_dense: max_seq_len=10 must be >= Nk=12"):
        make("synthesizer_dense", L=10)(q, k, v)
    make("synthesizer_dense", L=12)(q, k, v)  # Nq is free: each query makes its own row
    with pytest.raises(ValueError, match=r"synthesizer_random: max_seq_len=10 must be >= Nk=12"):
        make("synthesizer_random", L=10)(q, k, v)
    with pytest.raises(ValueError, match=r"synthesizer_random: max_seq_len=4 must be >= Nq=5"):
        make("synthesizer_random", L=4)(q, k[:, :, :4], v[:, :, :4])


def test_bad_hyperparameters_and_shapes():
    with pytest.raises(ValueError, match=r"'max_seq_len' is required"):
        attnlab.create("synthesizer_dense", head_dim=4)
    with pytest.raises(ValueError, match=r"'hidden' must be >= 1; got 0"):
        attnlab.create("synthesizer_dense", head_dim=4, max_seq_len=8, hidden=0)
    with pytest.raises(ValueError, match=r"'rank' must be >= 1; got 0"):
        attnlab.create("synthesizer_factorized_random", num_heads=2, max_seq_len=8, rank=0)
    q, k, v = (t.detach() for t in rand_qkv(1, 3, 5, 5, 4, 4))
    with pytest.raises(ValueError, match=r"synthesizer_random: num_heads=2 .* does not match "
                                         r"the H=3 heads of q"):
        make("synthesizer_random", H=2)(q, k, v)
    make("synthesizer_random", H=2, per_head=False)(q, k, v)  # shared R: any H
    with pytest.raises(ValueError, match=r"synthesizer_dense: q head dim 4 does not match "
                                         r"head_dim=3"):
        make("synthesizer_dense", D=3)(q, k, v)


def test_half_precision_matches_float32():
    q, k, v = (t.detach() for t in rand_qkv(1, 2, 8, 8, 4, 4))
    for name in NAMES:
        mech = make(name)
        ref = mech(q, k, v, is_causal=True)
        out = mech.to(torch.float16)(q.half(), k.half(), v.half(), is_causal=True)
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=1e-2)


@pytest.mark.parametrize("name", NAMES)
def test_dropout_drops_weights_and_is_unbiased(name):
    mech = make(name, D=4, H=2, L=12)
    q, k, v = (t.detach() for t in rand_qkv(1, 2, 8, 8, 4, 4, seed=4))
    ref = mech(q, k, v)
    torch.manual_seed(0)
    one = mech(q, k, v, dropout_p=0.5)
    assert (one - ref).abs().max() > 1e-2 and torch.isfinite(one).all()
    many = [t.expand(600, -1, -1, -1) for t in (q, k, v)]  # 600 independent draws
    mean = mech(*many, dropout_p=0.5).mean(0, keepdim=True)
    torch.testing.assert_close(mean, ref, rtol=0, atol=0.2)
