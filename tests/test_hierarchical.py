"""H-Transformer-1D (``hierarchical``): its own hierarchical formula, written densely here.

The reference builds the ``N x N`` logits pair by pair: the level that holds pair ``(i, j)``
(the finest ``l`` at which their blocks of ``Nr 2^l`` tokens are equal or adjacent), and at
that level the score of the averaged query and key of the ``2^l``-token groups holding
``i`` and ``j``; a plain float64 softmax then weights the fine values. No attnlab code is
used. Then: the limit (one block is exact attention, against SDPA), causality, key
padding, the shared max across levels, memory (no ``N x N`` tensor), gradients, errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LargestTensor
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
import attnlab.mechanisms.hierarchical  # noqa: F401
from attnlab.mechanisms.hierarchical import levels_for

TIGHT = dict(rtol=1e-10, atol=1e-10)


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def qkv(B, H, n, D, seed=0, grad=False):
    return tuple(rand(B, H, n, D, seed=seed + i).requires_grad_(grad) for i in range(3))


# ---------------------------------------------------------------- the dense reference
def level_of(i, j, nr, levels, causal):
    """The level holding pair (i, j): the finest l with |b_l(i) - b_l(j)| <= 1, b_l the
    block of Nr 2^l tokens; None if no level up to ``levels`` does (or j > i, causal)."""
    if causal and j > i:
        return None
    for level in range(levels + 1):
        if abs(i // (nr << level) - j // (nr << level)) <= 1:
            return level
    return None


def group_means(x, keep, level):
    """Row t: the mean of x over the real tokens s with s // 2^level == t // 2^level
    (zeros if there is none)."""
    B, H, n, D = x.shape
    out = torch.zeros(B, H, n, D, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            for t in range(n):
                members = [s for s in range(n) if s >> level == t >> level and keep[b, h, s]]
                if members:
                    out[b, h, t] = x[b, h, members].mean(dim=0)
    return out


def hierarchical_reference(q, k, v, nr, levels=None, causal=False, keep=None, scale=None):
    """out_i = softmax_j(logit_ij) v_j over the pairs some level holds and real keys j,
    logit_ij = scale Q^(l)_i . K^(l)_j at the level l of (i, j): group means at l >= 1
    (fine queries in the causal form), the tokens themselves at l = 0."""
    B, H, n, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    keep = torch.ones(B, H, n, dtype=torch.bool) if keep is None else keep.expand(B, H, n)
    if levels is None:  # the fewest levels that hold every pair
        levels = 0
        while any(level_of(i, j, nr, levels, False) is None for i in range(n) for j in range(n)):
            levels += 1
    lv = torch.tensor([[-1 if (lo := level_of(i, j, nr, levels, causal)) is None else lo
                        for j in range(n)] for i in range(n)])
    logits = torch.full((B, H, n, n), -math.inf, dtype=torch.float64)
    for level in range(levels + 1):
        qs = q if level == 0 or causal else group_means(q, keep, level)
        ks = k if level == 0 else group_means(k, keep, level)
        logits = torch.where(lv == level, scale * qs @ ks.transpose(-2, -1), logits)
    logits = logits.masked_fill(~keep[:, :, None, :], -math.inf)
    row_max = logits.amax(dim=-1, keepdim=True)
    e = torch.exp(logits - torch.where(torch.isinf(row_max), 0.0, row_max))
    z = e.sum(dim=-1, keepdim=True)
    return (e / torch.where(z > 0, z, 1.0)) @ v


def test_registered_with_truthful_flags():
    s = attnlab.get("hierarchical")
    assert s.family == "hierarchical" and attnlab.get("h_transformer_1d") is s
    assert s.causal and s.key_padding and not s.arbitrary_mask and not s.cross
    assert not s.exact and not s.returns_weights and not s.kv_cache and not s.learnable
    assert "N^2" not in s.memory


# ---------------------------------------------------------------- the limit: one block
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,nr", [(1, 2), (7, 8), (16, 16), (13, 8), (32, 16)])
def test_a_sequence_within_two_blocks_is_exact_attention(n, nr, causal):
    # N <= Nr is one block; N <= 2 Nr still has no coarse level (the tridiagonal holds all).
    q, k, v = qkv(2, 3, n, 5)
    mech = attnlab.create("hierarchical", block_size=nr)
    assert mech.levels(n) == 0
    for scale in (None, 0.3):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        torch.testing.assert_close(mech(q, k, v, is_causal=causal, scale=scale), want, **TIGHT)


def test_with_coarse_levels_it_is_not_exact_attention():
    q, k, v = qkv(1, 2, 33, 4)
    out = attnlab.create("hierarchical", block_size=4)(q, k, v)
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-2


# ---------------------------------------------------------------- its own formula
@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_dense_hierarchical_matrix_n32_block4(causal):
    """N = 32, Nr = 4: 8 blocks, levels 0, 1, 2; outputs and gradients."""
    q, k, v = qkv(2, 2, 32, 3, seed=5, grad=True)
    mech = attnlab.create("hierarchical", block_size=4)
    assert mech.levels(32) == 2
    out = mech(q, k, v, is_causal=causal)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = hierarchical_reference(q2, k2, v2, 4, causal=causal)
    torch.testing.assert_close(out, ref, **TIGHT)
    dout = rand(*out.shape, seed=9)
    out.backward(dout)
    ref.backward(dout)
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(got, want, **TIGHT)


@settings(max_examples=40)
@given(data=st.data())
def test_equals_the_dense_hierarchical_matrix_for_any_shape(data):
    n = data.draw(st.integers(1, 40), label="N")  # multiples of Nr 2^L or not
    B, H, D = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    nr = data.draw(st.sampled_from([2, 4, 6]), label="block_size")
    levels = data.draw(st.one_of(st.none(), st.integers(0, 3)), label="num_levels")
    causal = data.draw(st.booleans(), label="causal")
    kind = data.draw(st.sampled_from(["none", "batch", "head"]), label="padding")
    q, k, v = qkv(B, H, n, D, seed=n)
    keep = None
    if kind != "none":
        g = torch.Generator().manual_seed(n + 1)
        keep = torch.rand(B, H if kind == "head" else 1, n, generator=g) < 0.7
    mech = attnlab.create("hierarchical", block_size=nr, num_levels=levels)
    with torch.no_grad():
        out = mech(q, k, v, is_causal=causal,
                   attn_mask=None if keep is None else keep[:, :, None, :])
    ref = hierarchical_reference(q, k, v, nr, levels, causal, keep)
    torch.testing.assert_close(out, ref, **TIGHT)


@settings(max_examples=30)
@given(n=st.integers(1, 70), nr=st.sampled_from([2, 4, 8]))
def test_the_derived_levels_are_the_fewest_that_hold_every_pair(n, nr):
    L = levels_for(n, nr)
    held = all(level_of(i, j, nr, L, False) is not None for i in range(n) for j in range(n))
    assert held
    if L > 0:
        assert not all(level_of(i, j, nr, L - 1, False) is not None
                       for i in range(n) for j in range(n))
    assert levels_for(n, nr, 1) == min(1, L)


def test_levels_are_combined_against_one_shared_max():
    # Scores of 1e3 in float32: levels exponentiated against their own maxima and summed
    # unrescaled would be off by e^(gap between the levels' maxima); a max taken over
    # the levels keeps float32 within rounding of the float64 formula.
    q, k, v = qkv(1, 2, 40, 4, seed=3)
    q, k = (t / t.norm(dim=-1, keepdim=True) * 30.0 for t in (q, k))
    mech = attnlab.create("hierarchical", block_size=4)
    out = mech(q.float(), k.float(), v.float(), scale=1.0)
    ref = hierarchical_reference(q, k, v, 4, scale=1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-3)


# ---------------------------------------------------------------- causality
@pytest.mark.parametrize("n", [37, 64])
def test_causal_output_ignores_future_tokens(n):
    q, k, v = qkv(2, 2, n, 4, seed=1)
    mech = attnlab.create("hierarchical", block_size=4)
    out = mech(q, k, v, is_causal=True)
    for i in (0, 5, 17, n - 2):
        q2, k2, v2 = (torch.cat([t[:, :, :i + 1], rand(2, 2, n - i - 1, 4, seed=50 + s)], dim=2)
                      for s, t in enumerate((q, k, v)))
        torch.testing.assert_close(mech(q2, k2, v2, is_causal=True)[:, :, :i + 1],
                                   out[:, :, :i + 1], **TIGHT)
        # Bidirectional, the same change reaches the past: the check can fail.
        assert (mech(q2, k2, v2)[:, :, :i + 1] - mech(q, k, v)[:, :, :i + 1]).abs().max() > 1e-6


# ---------------------------------------------------------------- key padding
def test_right_padding_gives_the_unpadded_sequence():
    q, k, v = qkv(2, 2, 45, 4, seed=2)
    keep = torch.ones(2, 45, dtype=torch.bool)
    keep[0, 30:] = False
    keep[1, 21:] = False
    mech = attnlab.create("hierarchical", block_size=4)
    for causal in (False, True):
        out = mech(q, k, v, attn_mask=keep[:, None, None, :], is_causal=causal)
        for b, length in ((0, 30), (1, 21)):
            alone = mech(*(t[b:b + 1, :, :length] for t in (q, k, v)), is_causal=causal)
            torch.testing.assert_close(out[b:b + 1, :, :length], alone, **TIGHT)


def test_padded_content_reaches_no_real_row_and_gets_no_gradient():
    q, k, v = qkv(2, 2, 29, 4, seed=4, grad=True)
    keep = torch.rand(2, 1, 29, generator=torch.Generator().manual_seed(0)) < 0.6
    mask = keep[:, :, None, :]
    mech = attnlab.create("hierarchical", block_size=2)
    out = mech(q, k, v, attn_mask=mask)
    noisy = [torch.where(keep[..., None], t.detach(), 10 * rand(*t.shape, seed=7 + i) + 3)
             for i, t in enumerate((q, k, v))]
    real = keep.expand(2, 2, 29)
    torch.testing.assert_close(mech(*noisy, attn_mask=mask)[real], out[real], **TIGHT)
    gk, gv = torch.autograd.grad(out.sum(), (k, v))
    assert (gk[~real] == 0).all() and (gv[~real] == 0).all()


def test_a_fully_padded_row_gives_zeros_and_finite_gradients():
    q, k, v = qkv(2, 2, 20, 4, grad=True)
    keep = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    keep[1] = False
    out = attnlab.create("hierarchical", block_size=2)(q, k, v, attn_mask=keep)
    assert (out[1] == 0).all()
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[1] == 0).all()


# ---------------------------------------------------------------- memory: no N x N tensor
@pytest.mark.parametrize("causal", [False, True])
def test_no_tensor_grows_with_n_squared(causal):
    n, nr, d = 16384, 16, 16
    q, k, v = (rand(1, 1, n, d, seed=i, dtype=torch.float32) for i in range(3))
    mech = attnlab.create("hierarchical", block_size=nr)
    with torch.no_grad(), LargestTensor() as mode:
        out = mech(q, k, v, is_causal=causal)
    assert out.shape == (1, 1, n, d) and torch.isfinite(out).all()
    # The largest: level 0's scores, N x 3 Nr, or its gathered keys, N x 3 D.
    assert mode.largest <= 3 * n * max(nr, d), mode.largest
    assert mode.largest < n * n // 256


# ---------------------------------------------------------------- gradients, dtypes
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_gradcheck(causal, padded):
    q, k, v = qkv(1, 2, 11, 3, seed=8, grad=True)
    mask = None
    if padded:
        mask = torch.tensor([True] * 7 + [False, True, False, False])[None, None, None, :]
    mech = attnlab.create("hierarchical", block_size=2)
    assert torch.autograd.gradcheck(
        lambda q, k, v: mech(q, k, v, attn_mask=mask, is_causal=causal), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(dtype):
    q, k, v = (t.to(dtype) for t in qkv(1, 2, 24, 8, seed=6))
    out = attnlab.create("hierarchical", block_size=4)(q, k, v, is_causal=True)
    assert out.dtype == dtype
    ref = hierarchical_reference(*(t.double() for t in (q, k, v)), 4, causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_dropout_drops_weights_but_not_the_normaliser():
    # v = 1: without dropout every row is 1; with it, mean over draws stays near 1.
    q, k, _ = qkv(1, 1, 64, 4, seed=2)
    v = torch.ones(1, 1, 64, 1, dtype=torch.float64)
    mech = attnlab.create("hierarchical", block_size=4)
    torch.testing.assert_close(mech(q, k, v), torch.ones_like(v), **TIGHT)
    torch.manual_seed(0)
    draws = torch.stack([mech(q, k, v, dropout_p=0.5) for _ in range(400)])
    assert (draws.std(dim=0) > 0).all()
    assert (draws.mean(dim=0) - 1).abs().max() < 0.2


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("hp,exc,match", [
    (dict(block_size=3), ValueError, r"'block_size' must be a multiple of 2 \(.*straddles.*\); got 3"),
    (dict(block_size=1), ValueError, r"'block_size' must be >= 2; got 1"),
    (dict(block_size=4.0), TypeError, r"'block_size' must be an int; got float 4.0"),
    (dict(num_levels=-1), ValueError, r"'num_levels' must be >= 0; got -1"),
    (dict(num_levels=True), TypeError, r"'num_levels' must be an int; got bool"),
    (dict(levels=2), TypeError, r"unknown hyperparameter 'levels'.*did you mean 'num_levels'"),
])
def test_bad_hyperparameters(hp, exc, match):
    with pytest.raises(exc, match=match):
        attnlab.create("hierarchical", **hp)


def test_refused_calls():
    mech = attnlab.create("hierarchical", block_size=2)
    q, k, v = qkv(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"hierarchical cannot take an arbitrary attn_mask"):
        mech(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"hierarchical needs Nq == Nk .*Nq=3, Nk=8"):
        mech(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match=r"hierarchical cannot return attention weights"):
        mech(q, k, v, need_weights=True)
