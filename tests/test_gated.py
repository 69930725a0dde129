"""The Gated Attention Unit (attnlab.mechanisms.gated): Hua et al. 2022's GAU.

Evidence: a dense float64 GAU written here (loops over batch and head, SiLU as
``x * sigmoid(x)``) equals the module over shapes, masks, causal, gate and activation
(hypothesis), and so does the module's own reference; with the gate off it is exactly
``relu^2(Q K^T / n) V``, and the gate multiplies that; the ``1/n`` sits inside the square
(duplicating every key halves the output); the scales and offsets act per dimension;
no look-ahead when causal; masked keys get exactly zero weight and gradient; gradcheck;
dropout on ``A``; bad hyperparameters and shapes raise naming them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import attnlab
import attnlab.mechanisms.gated  # noqa: F401
from attnlab.mechanisms.gated import gau_reference
from attnlab.nn import KVCache, MultiheadAttention
from attnlab.verify import verify

TIGHT = dict(rtol=1e-10, atol=1e-12)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def gau(D=4, Dv=None, seed=0, randomise=True, **hp):
    """A float64 GAU; ``randomise``: gamma, beta drawn at unit size (offsets not 0)."""
    torch.manual_seed(seed)
    m = attnlab.create("gau", head_dim=D, value_dim=Dv, **hp).double()
    if randomise:
        with torch.no_grad():
            m.gamma.copy_(rand(2, D, seed=seed + 1))
            m.beta.copy_(0.5 * rand(2, D, seed=seed + 2))
    return m


def dense_gau(m, q, k, v, *, scale=1.0, causal=False, mask=None):
    """The GAU written plainly: per (batch, head), Q = gamma_q phi(q) + beta_q, ...,
    A_ij = max(scale Q_i.K_j / Nk + b_ij, 0)^2 (0 where a pair is not allowed),
    out = phi(q W_u) * (A phi(v))."""
    def phi(x):
        return x * torch.sigmoid(x) if m.hp["activation"] == "silu" else x

    g, b = m.gamma.detach().double(), m.beta.detach().double()
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    full = (None if mask is None else
            mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(B, H, Nq, Nk))
    out = torch.zeros(B, H, Nq, v.shape[-1], dtype=torch.float64)
    for bi in range(B):
        for h in range(H):
            Q = g[0] * phi(q[bi, h]) + b[0]
            K = g[1] * phi(k[bi, h]) + b[1]
            s = scale * (Q @ K.T) / Nk
            allowed = torch.ones(Nq, Nk, dtype=torch.bool)
            if full is not None and full.dtype == torch.bool:
                allowed &= full[bi, h]
            elif full is not None:
                s = s + full[bi, h].double()
            if causal:
                allowed &= torch.ones(Nq, Nk, dtype=torch.bool).tril()
            A = torch.where(allowed & (s > 0), s * s, torch.zeros((), dtype=torch.float64))
            o = A @ phi(v[bi, h])
            if m.hp["gate"]:
                o = phi(q[bi, h] @ m.W_u.detach().double()) * o
            out[bi, h] = o
    return out


# ---------------------------------------------------------------- the formula
def test_without_the_gate_it_is_squared_relu_attention():
    m = gau(gate=False, activation="identity", init="identity", randomise=False)
    q, k, v = rand(2, 3, 7, 4, seed=1), rand(2, 3, 9, 4, seed=2), rand(2, 3, 9, 5, seed=3)
    want = torch.relu(q @ k.transpose(-2, -1) / 9) ** 2 @ v
    torch.testing.assert_close(m(q, k, v), want, **TIGHT)
    out, w = m(q, k, v, need_weights=True)
    torch.testing.assert_close(w, torch.relu(q @ k.transpose(-2, -1) / 9) ** 2, **TIGHT)
    torch.testing.assert_close(out, w @ v, **TIGHT)


@pytest.mark.parametrize("activation", ["silu", "identity"])
def test_the_gate_multiplies_the_attention(activation):
    gated = gau(activation=activation, seed=4)
    plain = gau(gate=False, activation=activation, seed=4)
    torch.testing.assert_close(plain.gamma, gated.gamma)
    q, k, v = (rand(2, 2, 6, 4, seed=i) for i in range(3))
    phi = F.silu if activation == "silu" else (lambda x: x)
    U = phi(q @ gated.W_u.detach())
    torch.testing.assert_close(gated(q, k, v), U * plain(q, k, v), **TIGHT)
    assert (U - 1).abs().max() > 0.1  # a gate that does something


def test_one_over_n_sits_inside_the_square():
    """relu^2(s / n): every key twice (n -> 2n) gives A / 4 on twice the terms, out / 2;
    a 1/n outside the square would give out, a softmax out as well."""
    m = gau(gate=False, seed=5)
    q, k, v = (rand(2, 2, 6, 4, seed=10 + i) for i in range(3))
    twice = m(q, torch.cat([k, k], 2), torch.cat([v, v], 2))
    torch.testing.assert_close(twice, m(q, k, v) / 2, **TIGHT)


def test_scale_multiplies_the_normalised_scores():
    m = gau(seed=6)
    q, k, v = (rand(1, 2, 5, 4, seed=20 + i) for i in range(3))
    torch.testing.assert_close(m(q, k, v, scale=3.0), dense_gau(m, q, k, v, scale=3.0), **TIGHT)
    torch.testing.assert_close(m(q, k, v), dense_gau(m, q, k, v, scale=1.0), **TIGHT)
    assert (m(q, k, v, scale=3.0) - m(q, k, v)).abs().max() > 1e-3


@st.composite
def cases(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    Nq, Nk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    D, Dv = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    causal = draw(st.booleans())
    kind = draw(st.sampled_from(["none", "bool", "float"]))
    seed = draw(st.integers(0, 2**16))
    mask = None
    if kind != "none":
        g = torch.Generator().manual_seed(seed)
        shape = draw(st.sampled_from([(Nq, Nk), (B, 1, 1, Nk), (B, H, Nq, Nk)]))
        mask = torch.rand(shape, generator=g) < 0.7
        if kind == "float":
            bias = torch.randn(shape, generator=g, dtype=torch.float64)
            mask = bias.masked_fill(~mask, float("-inf"))
    return B, H, Nq, Nk, D, Dv, causal, mask, seed


@settings(max_examples=40, deadline=None)
@given(case=cases(), gate=st.booleans(), activation=st.sampled_from(["silu", "identity"]))
def test_equals_the_dense_float64_gau(case, gate, activation):
    B, H, Nq, Nk, D, Dv, causal, mask, seed = case
    m = gau(D, Dv, seed=seed, gate=gate, activation=activation)
    q, k, v = rand(B, H, Nq, D, seed=seed), rand(B, H, Nk, D, seed=seed + 1), \
        rand(B, H, Nk, Dv, seed=seed + 2)
    out, w = m(q, k, v, attn_mask=mask, is_causal=causal, need_weights=True)
    torch.testing.assert_close(out, dense_gau(m, q, k, v, causal=causal, mask=mask), **TIGHT)
    assert w.shape == (B, H, Nq, Nk) and (w >= 0).all()
    if mask is None:  # the module's own reference (the correctness gate's) agrees too
        ref = gau_reference(q, k, v, mech=m, scale=None, is_causal=causal)
        torch.testing.assert_close(out, ref, **TIGHT)


# ---------------------------------------------------------------- per-dim scale and offset
def test_scale_and_offset_act_per_dimension():
    """Q_d = gamma_qd Z_d + beta_qd: with Z_d = 0 (q_d = 0, SiLU(0) = 0), gamma_q[d] cannot
    matter, while gamma_q of another dim does; likewise beta_q[d] when K_d = 0."""
    d, e = 1, 2
    m = gau(seed=7)
    q, k, v = (rand(2, 2, 6, 4, seed=30 + i) for i in range(3))
    q[..., d] = 0.0
    base = m(q, k, v)

    def changed(param, row, dim):
        with torch.no_grad():
            param[row, dim] += 0.7
        try:
            return m(q, k, v)
        finally:
            with torch.no_grad():
                param[row, dim] -= 0.7

    assert torch.equal(changed(m.gamma, 0, d), base)
    assert (changed(m.gamma, 0, e) - base).abs().max() > 1e-3
    k2 = k.clone()
    k2[..., d] = 0.0
    with torch.no_grad():
        m.beta[1, d] = 0.0  # K_d = gamma_kd * 0 + 0
    base = m(q, k2, v)
    with torch.no_grad():
        m.beta[0, d] += 0.7
    torch.testing.assert_close(m(q, k2, v), base, rtol=0, atol=1e-15)
    with torch.no_grad():
        m.beta[0, e] += 0.7
    assert (m(q, k2, v) - base).abs().max() > 1e-3


# ---------------------------------------------------------------- causal and masks
def test_causal_rows_never_see_later_tokens():
    m = gau(seed=8)
    q, k, v = (rand(2, 2, 10, 4, seed=40 + i) for i in range(3))
    out = m(q, k, v, is_causal=True)
    for t in range(10):
        later = (slice(None), slice(None), slice(t + 1, None))
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[later] = rand(*x[later].shape, seed=50 + t) * 10
        out2 = m(q2, k2, v2, is_causal=True)
        assert torch.equal(out2[:, :, :t + 1], out[:, :, :t + 1])


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masked_keys_get_exactly_zero_weight_and_gradient(kind):
    m = gau(seed=9)
    keep = torch.tensor([[True, False, True, True, False, True, False, True],
                         [False, True, True, False, True, True, True, False]])
    mask = keep[:, None, None, :]
    if kind == "float":
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    q = rand(2, 2, 5, 4, seed=60)
    k, v = (rand(2, 2, 8, 4, seed=61 + i).requires_grad_() for i in range(2))
    out, w = m(q, k, v, attn_mask=mask, need_weights=True)
    dead = ~keep[:, None, None, :].expand(w.shape)
    assert (w[dead] == 0).all() and (w[~dead] > 0).any()
    # New content at the masked keys changes nothing, and no gradient reaches them.
    pad = ~keep[:, None, :, None].expand(k.shape)
    k2, v2 = (torch.where(pad, 100 * rand(*x.shape, seed=70 + i), x.detach())
              for i, x in enumerate((k, v)))
    assert torch.equal(m(q, k2, v2, attn_mask=mask), out)
    gk, gv = torch.autograd.grad((out * rand(*out.shape, seed=72)).sum(), (k, v))
    assert (gk[pad] == 0).all() and (gv[pad] == 0).all()
    assert gk[~pad].abs().max() > 0


def test_fully_masked_rows_are_zero_without_nan():
    m = gau(seed=10)
    q, k, v = (rand(1, 2, 4, 4, seed=80 + i).requires_grad_() for i in range(3))
    allowed = torch.ones(4, 4, dtype=torch.bool)
    allowed[2] = False
    out = m(q, k, v, attn_mask=allowed)
    assert (out[:, :, 2] == 0).all() and torch.isfinite(out).all()
    out.square().sum().backward()
    assert (q.grad[:, :, 2] == 0).all() and torch.isfinite(k.grad).all()


# ---------------------------------------------------------------- gradients, dropout, dtypes
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    m = gau(D=3, Dv=2, seed=11)
    with torch.no_grad():  # Q, K mostly > 0: most scores positive, where relu^2 has slope
        m.gamma.copy_(1 + 0.2 * rand(2, 3, seed=12))
        m.beta.copy_(0.5 + 0.1 * rand(2, 3, seed=13))
    q = rand(1, 2, 4, 3, seed=90).requires_grad_()
    k = rand(1, 2, 5 if not causal else 4, 3, seed=91).requires_grad_()
    v = rand(1, 2, k.shape[2], 2, seed=92).requires_grad_()
    mask = torch.rand(4, k.shape[2], generator=torch.Generator().manual_seed(3)) < 0.8

    def f(q, k, v, gamma, beta, W_u):  # the parameters as inputs, to check theirs too
        params = {"gamma": gamma, "beta": beta, "W_u": W_u}
        return functional_call(m, params, (q, k, v), dict(attn_mask=mask, is_causal=causal))

    assert torch.autograd.gradcheck(f, (q, k, v, *(p.detach().clone().requires_grad_()
                                                   for p in (m.gamma, m.beta, m.W_u))))
    out, A = m(q, k, v, is_causal=causal, need_weights=True)
    assert (A > 0).sum() > A.numel() / 3
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in m.parameters())


def test_dropout_drops_entries_of_A_and_weights_come_back_undropped():
    m = gau(gate=False, seed=12)
    q, k, v = (rand(2, 2, 6, 4, seed=100 + i) for i in range(3))
    A = m(q, k, v, need_weights=True)[1]
    torch.manual_seed(5)
    out, w = m(q, k, v, dropout_p=0.5, need_weights=True)
    torch.manual_seed(5)
    dropped = F.dropout(A, 0.5)
    torch.testing.assert_close(out, dropped @ F.silu(v), **TIGHT)
    torch.testing.assert_close(w, A, **TIGHT)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_close_to_float64(dtype):
    m = gau(D=8, seed=13)
    q, k, v = (rand(2, 2, 16, 8, seed=110 + i).to(dtype) for i in range(3))
    out = m.to(dtype)(q, k, v, is_causal=True)
    assert out.dtype == dtype
    ref = dense_gau(m, q.double(), k.double(), v.double(), causal=True)
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < 4 * torch.finfo(dtype).eps, err


def test_a_float16_result_out_of_range_raises_instead_of_inf():
    """relu^2 has no softmax to bound it: scores of 300 give A of 9e4 > 65504."""
    m = attnlab.create("gau", head_dim=4, gate=False, activation="identity").half()
    q = torch.full((1, 1, 2, 4), 17.0, dtype=torch.float16)
    top = 2 * (4 * 17.0**2 / 2) ** 2 * 17.0  # 2 keys of A = (Q.K / n)^2 times v = 17
    with pytest.raises(ValueError, match=rf"gau: the result overflows torch.float16 \(max "
                                         rf"\|value\| {top:.3g} > 65504".replace("+", r"\+")):
        m(q, q, q)
    assert torch.isfinite(m.to(torch.bfloat16)(q.bfloat16(), q.bfloat16(), q.bfloat16())).all()
    small = q / 16  # the same unit in range: no error
    assert torch.isfinite(m.half()(small, small, small)).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("init", ["identity", "paper"])
def test_the_correctness_gate_passes(causal, init):
    for dtype in (torch.float32, torch.float64):
        r = verify("gau", causal=causal, dtype=dtype, init=init)
        assert r.ok, r


# ---------------------------------------------------------------- construction and errors
def test_initialisation():
    m = attnlab.create("gau", head_dim=4096, value_dim=3)
    assert torch.equal(m.gamma, torch.ones(2, 4096)) and torch.equal(m.beta, torch.zeros(2, 4096))
    assert m.W_u.shape == (4096, 3)
    p = attnlab.create("gau", head_dim=4096, init="paper", gate=False)
    assert 0.018 < float(p.gamma.detach().std()) < 0.022 and (p.beta == 0).all()
    assert not hasattr(p, "W_u") and {n for n, _ in p.named_parameters()} == {"gamma", "beta"}


def test_in_a_layer_padded_keys_get_no_weight():
    layer = MultiheadAttention(16, 2, "gau", dtype=torch.float64).eval()
    assert layer.attn.hp["head_dim"] == 8
    x = rand(2, 6, 16, seed=120)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    out, w = layer(x, key_padding_mask=pad, need_weights=True, is_causal=True)
    assert (w[1, :, :, 4:] == 0).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("hp,exc,match", [
    ({}, ValueError, r"gau: hyperparameter 'head_dim' is required"),
    ({"head_dim": 0}, ValueError, r"'head_dim' must be >= 1; got 0"),
    ({"head_dim": 4, "value_dim": 0}, ValueError, r"'value_dim' must be >= 1; got 0"),
    ({"head_dim": 4, "gate": 1}, TypeError, r"'gate' must be a bool; got int 1"),
    ({"head_dim": 4, "activation": "silu2"}, ValueError,
     r"'activation' must be one of \['silu', 'identity'\]; got 'silu2'; did you mean 'silu'"),
    ({"head_dim": 4, "init": "papr"}, ValueError, r"'init' must be one of .*did you mean 'paper'"),
    ({"head_dim": 4, "gama": 1.0}, TypeError, r"gau: unknown hyperparameter 'gama'"),
])
def test_bad_hparams(hp, exc, match):
    with pytest.raises(exc, match=match):
        attnlab.create("gau", **hp)


def test_bad_shapes_name_the_dimension():
    q = rand(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"gau: q head dim 4 does not match head_dim=5"):
        attnlab.create("gau", head_dim=5)(q, q, q)
    with pytest.raises(ValueError, match=r"gau: v head dim 3 does not match the gate's width "
                                         r"value_dim=4"):
        attnlab.create("gau", head_dim=4)(q, q, q[..., :3])
    assert attnlab.create("gau", head_dim=4, gate=False)(q, q, q[..., :3]).shape == (1, 2, 3, 3)
    # 1/n changes as keys are appended: decoding would not be the causal forward.
    with pytest.raises(ValueError, match=r"mechanism 'gau' cannot decode with a kv_cache"):
        MultiheadAttention(8, 2, "gau")(torch.randn(1, 3, 8), kv_cache=KVCache())
