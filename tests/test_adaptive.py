"""Adaptive attention span (``adaptive_span``): the paper's soft-masked formula against a
naive float64 O(N^2) implementation, the limit span >= N against exact attention, and
proof that the computation is cropped (saved tensors grow as N * span, not N^2)."""

from __future__ import annotations

import pytest
import torch
from conftest import naive_attention_f64
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab


def make(H=2, dtype=torch.float32, **hp):
    hp.setdefault("max_span", 8)
    hp.setdefault("ramp", 3)
    return attnlab.create("adaptive_span", num_heads=H, **hp).to(dtype)


def rand_qkv(B, H, N, D, Dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for d in (D, D, Dv)]


def naive_adaptive(q, k, v, frac, S, R, causal, mask=None, scale=None):
    """a_tr = m_z(t-r) exp(s_tr) / sum_q m_z(t-q) exp(s_tq), written out over all N x N pairs
    in float64; z = S * clamp(frac); keys at distance >= S never attended."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, N, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    z = S * frac.double().clamp(0, 1)
    i = torch.arange(N).view(-1, 1)
    j = torch.arange(N).view(1, -1)
    x = (i - j) if causal else (i - j).abs()
    m = ((R + z.view(H, 1, 1) - x) / R).clamp(0, 1)
    m = torch.where((x >= 0) & (x < S), m, torch.zeros((), dtype=torch.float64))
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    ok = (m > 0).expand(B, H, N, N)
    if mask is not None:
        if mask.dtype == torch.bool:
            ok = ok & mask
        else:
            s = s + mask.double()
            ok = ok & ~torch.isneginf(mask)
    s = s.masked_fill(~ok, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isneginf(mx), 0.0, mx)
    e = m * torch.exp(s - mx)
    Z = e.sum(-1, keepdim=True)
    a = torch.where(Z > 0, e / torch.where(Z > 0, Z, 1.0), 0.0)
    return a @ v, a


def make_mask(kind, B, N, dtype, seed):
    g = torch.Generator().manual_seed(seed + 7)
    if kind == "none":
        return None
    if kind == "bool":
        return torch.rand(B, 1, N, N, generator=g) < 0.7
    if kind == "keypad":
        return torch.rand(B, 1, 1, N, generator=g) < 0.7
    if kind == "rows":
        return torch.rand(N, 1, generator=g) < 0.8
    m = torch.where(torch.rand(N, N, generator=g) < 0.7, 0.0, float("-inf"))
    return (m + 0.3 * torch.randn(N, N, generator=g)).to(dtype)


def grads(out, ins, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad((out * w).sum(), ins, allow_unused=True)


# ---------------------------------------------------------------- registry

def test_registered_flags():
    s = attnlab.get("adaptive_span")
    assert s.family == "adaptive" and not s.exact and s.learnable
    assert s.causal and s.arbitrary_mask and not s.cross and s.returns_weights
    assert "1905.07799" in s.paper.url and "m_z" in s.equation
    assert attnlab.get("adaptive_attention_span") is s


# ---------------------------------------------------------------- limit case: span >= N

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("N,block", [(29, 8), (40, 64), (33, 1)])
def test_span_covering_the_sequence_is_exact_attention(N, block, causal):
    # z = max_span = N + ramp: m_z(x) = 1 for every x < N, so the weights are softmax's.
    mech = make(H=3, max_span=N + 5, ramp=5, init_span=1.0, block_size=block)
    q, k, v = rand_qkv(2, 3, N, 6, 5, seed=N)
    out = mech(q, k, v, is_causal=causal)
    ref = naive_attention_f64(q, k, v, is_causal=causal)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    for g, r in zip(grads(out, (q, k, v)), grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=0, atol=1e-5)


def test_limit_case_with_mask_equals_exact_masked_attention():
    N = 24
    mech = make(H=2, max_span=64, ramp=4, init_span=1.0, block_size=5)
    q, k, v = rand_qkv(2, 2, N, 4, 4, seed=5)
    mask = make_mask("bool", 2, N, torch.float32, 1)
    out = mech(q, k, v, attn_mask=mask, is_causal=True)
    ref = naive_attention_f64(q, k, v, mask, is_causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    for g, r in zip(grads(out, (q, k, v)), grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- small spans: the formula

@settings(max_examples=30)
@given(N=st.integers(1, 30), H=st.integers(1, 3), S=st.integers(1, 20), R=st.integers(1, 6),
       block=st.integers(1, 12), causal=st.booleans(), seed=st.integers(0, 10_000),
       kind=st.sampled_from(["none", "bool", "float", "keypad", "rows"]))
def test_soft_masked_attention_equals_naive_formula(N, H, S, R, block, causal, seed, kind):
    torch.manual_seed(seed)
    mech = make(H=H, dtype=torch.float64, max_span=S, ramp=R, block_size=block)
    with torch.no_grad():  # spans anywhere in [0, S], fractional, ramps half-way inside
        mech.span_frac.copy_(torch.rand(H, dtype=torch.float64))
    q, k, v = rand_qkv(2, H, N, 3, 2, dtype=torch.float64, seed=seed)
    mask = make_mask(kind, 2, N, torch.float64, seed)
    frac = mech.span_frac.detach().clone().requires_grad_()
    out = mech(q, k, v, attn_mask=mask, is_causal=causal, scale=0.7)
    ref, _ = naive_adaptive(q, k, v, frac, S, R, causal, mask, scale=0.7)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    got = grads(out, (q, k, v, mech.span_frac))
    want = grads(ref, (q, k, v, frac))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-9)


def test_float32_small_span_within_1e5_and_span_gradient():
    N, H = 50, 2
    mech = make(H=H, max_span=16, ramp=4, block_size=8)
    with torch.no_grad():
        mech.span_frac.copy_(torch.tensor([0.3, 0.55]))  # z = 4.8 and 8.8: ramps inside
    q, k, v = rand_qkv(1, H, N, 8, 8, seed=2)
    frac = mech.span_frac.detach().double().requires_grad_()
    out = mech(q, k, v, is_causal=True)
    ref, _ = naive_adaptive(q, k, v, frac, 16, 4, True)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    got = grads(out, (q, k, v, mech.span_frac))
    want = grads(ref, (q, k, v, frac))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=1e-5)
    assert got[3].abs().min() > 1e-4  # the loss really reaches every head's span


def test_weights_match_formula_and_vanish_beyond_the_span():
    N, H = 30, 2
    mech = make(H=H, dtype=torch.float64, max_span=10, ramp=2, block_size=7)
    with torch.no_grad():
        mech.span_frac.copy_(torch.tensor([0.25, 0.6], dtype=torch.float64))  # z = 2.5, 6
    q, k, v = rand_qkv(2, H, N, 4, 4, dtype=torch.float64)
    for causal in (True, False):
        _, w = mech(q, k, v, is_causal=causal, need_weights=True)
        _, ref = naive_adaptive(q, k, v, mech.span_frac, 10, 2, causal)
        torch.testing.assert_close(w, ref, rtol=0, atol=1e-12)
        dist = torch.arange(N).view(-1, 1) - torch.arange(N).view(1, -1)
        if not causal:
            dist = dist.abs()
        assert w[:, :, dist < 0].abs().sum() == 0  # causal: no future key
        assert w[:, 0][:, dist >= 5].abs().max() == 0  # z + R = 4.5: x >= 5 is cut
        assert w[:, 1][:, dist >= 8].abs().max() == 0  # z + R = 8
        assert w[:, 1][:, dist == 7].abs().min() > 0
        torch.testing.assert_close(w.sum(-1), torch.ones(2, H, N, dtype=torch.float64))


# ---------------------------------------------------------------- it really crops

def saved_bytes(mech, N, B=1, H=2, D=8):
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    seen = {}

    def pack(t):
        st_ = t.untyped_storage()
        seen[st_.data_ptr()] = max(seen.get(st_.data_ptr(), 0), st_.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mech(q, k, v, is_causal=True)
    out.sum().backward()  # and backward works from what was saved
    assert torch.isfinite(q.grad).all()
    return sum(seen.values()), max(seen.values())


def test_saved_tensors_are_n_times_span_not_n_squared():
    mech = make(H=2, max_span=256, ramp=32, init_span=0.25, block_size=64)  # z = 64, W = 96
    assert mech.window(2048) == 96
    total, largest = saved_bytes(mech, 2048)
    n_by_n = 2 * 2048 * 2048 * 4  # one float32 (B, H, N, N) tensor
    band = 2 * 2048 * (64 + 96) * 4  # one (B, H, N, block + W) tensor
    assert largest <= 1.1 * band, (largest, band)
    assert total < n_by_n / 4, (total, n_by_n)
    total_2x, _ = saved_bytes(mech, 4096)
    assert total_2x < 2.3 * total  # linear in N (quadratic would be 4x)


def test_window_follows_the_largest_span():
    mech = make(H=3, max_span=100, ramp=8)
    assert mech.window(1000) == 8  # z = 0: only the ramp
    with torch.no_grad():
        mech.span_frac.copy_(torch.tensor([0.1, 0.234, 0.0]))
    assert mech.window(1000) == 24 + 8 and mech.window(20) == 20
    torch.testing.assert_close(mech.spans, torch.tensor([10.0, 23.4, 0.0]))
    with torch.no_grad():
        mech.span_frac.fill_(1.0)
    assert mech.window(1000) == 100  # never beyond max_span


# ---------------------------------------------------------------- spans: loss and clamping

def test_span_loss_gradient_reaches_z_and_is_positive():
    mech = make(H=4, max_span=512, span_loss_coef=2e-6, init_span=0.25)
    loss = mech.span_loss()
    torch.testing.assert_close(loss, torch.tensor(2e-6 * 128.0))  # lambda * mean_h z_h
    loss.backward()
    torch.testing.assert_close(mech.span_frac.grad, torch.full((4,), 2e-6 * 512 / 4))
    assert (mech.span_frac.grad > 0).all()


def test_clamp_spans_keeps_z_in_range():
    mech = make(H=2, max_span=10)
    with torch.no_grad():
        mech.span_frac.copy_(torch.tensor([-0.5, 1.7]))
    torch.testing.assert_close(mech.spans, torch.tensor([0.0, 10.0]))  # forward clamps too
    mech.clamp_spans()
    torch.testing.assert_close(mech.span_frac.detach(), torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------- causality, masks, errors

@pytest.mark.parametrize("t0", [0, 9, 20])
def test_causal_future_tokens_do_not_change_the_past(t0):
    N = 26
    mech = make(H=2, max_span=12, ramp=3, init_span=0.5, block_size=4)
    q, k, v = (t.detach() for t in rand_qkv(1, 2, N, 4, 4, seed=1))
    out = mech(q, k, v, is_causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, t0 + 1:] = torch.randn_like(t[:, :, t0 + 1:]) * 5
    out2 = mech(q2, k2, v2, is_causal=True)
    torch.testing.assert_close(out2[:, :, : t0 + 1], out[:, :, : t0 + 1], rtol=0, atol=1e-6)
    assert (out2[:, :, t0 + 1:] - out[:, :, t0 + 1:]).abs().max() > 1e-3  # could fail


def test_fully_masked_rows_give_zeros_with_causal():
    N = 16
    mech = make(H=2, max_span=6, ramp=2, init_span=0.5, block_size=4)
    q, k, v = rand_qkv(2, 2, N, 4, 4)
    allowed = torch.ones(2, 1, N, N, dtype=torch.bool)
    allowed[0, 0, 3] = False
    allowed[1, 0, 12, 8:] = False  # row 12 can only reach keys 12 - j >= 5: outside z + R
    out, w = mech(q, k, v, attn_mask=allowed, is_causal=True, need_weights=True)
    assert out[0, :, 3].abs().max() == 0 and w[0, :, 3].abs().max() == 0
    assert out[1, :, 12].abs().max() == 0 and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert q.grad[0, :, 3].abs().max() == 0 and q.grad[1, :, 12].abs().max() == 0
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.isfinite(mech.span_frac.grad).all()


def test_half_precision_matches_float32():
    mech = make(H=2, max_span=8, ramp=2, init_span=0.5, block_size=4)
    q, k, v = (t.detach() for t in rand_qkv(1, 2, 20, 4, 4))
    ref = mech(q, k, v, is_causal=True)
    out = mech.to(torch.bfloat16)(*(t.bfloat16() for t in (q, k, v)), is_causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=5e-2)


BAD_HP = [
    (dict(max_span=0), ValueError, r"adaptive_span: hyperparameter 'max_span' must be >= 1; got 0"),
    (dict(ramp=0), ValueError, r"adaptive_span: hyperparameter 'ramp' must be >= 1; got 0"),
    (dict(init_span=1.5), ValueError, r"'init_span' must be >= 0.0 and <= 1.0; got 1.5"),
    (dict(init_span=-0.1), ValueError, r"'init_span' must be >= 0.0 and <= 1.0; got -0.1"),
    (dict(block_size=0), ValueError, r"'block_size' must be >= 1; got 0"),
    (dict(span_loss_coef=-1.0), ValueError, r"'span_loss_coef' must be >= 0.0; got -1.0"),
]


@pytest.mark.parametrize("hp,exc,pattern", BAD_HP, ids=[next(iter(b[0])) for b in BAD_HP])
def test_bad_hyperparameters_are_clear_errors(hp, exc, pattern):
    with pytest.raises(exc, match=pattern):
        attnlab.create("adaptive_span", num_heads=2, **hp)


def test_call_time_errors():
    with pytest.raises(ValueError, match=r"'num_heads' is required"):
        attnlab.create("adaptive_span")
    mech = make(H=3)
    q, k, v = (t.detach() for t in rand_qkv(1, 2, 10, 4, 4))
    with pytest.raises(ValueError, match=r"adaptive_span: num_heads=3 .* does not match the "
                                         r"H=2 heads of q"):
        mech(q, k, v)
    with pytest.raises(ValueError, match=r"adaptive_span needs Nq == Nk"):
        make(H=2)(q, k[:, :, :7], v[:, :, :7])


def test_dropout_drops_weights_and_is_unbiased():
    mech = make(H=2, max_span=6, ramp=2, init_span=0.5, block_size=4)
    q, k, v = (t.detach() for t in rand_qkv(1, 2, 10, 4, 4, seed=4))
    ref = mech(q, k, v, is_causal=True)
    torch.manual_seed(0)
    one = mech(q, k, v, is_causal=True, dropout_p=0.5)
    assert (one - ref).abs().max() > 1e-2 and torch.isfinite(one).all()
    many = [t.expand(600, -1, -1, -1) for t in (q, k, v)]  # 600 independent draws
    mean = mech(*many, is_causal=True, dropout_p=0.5).mean(0, keepdim=True)
    torch.testing.assert_close(mean, ref, rtol=0, atol=0.2)
