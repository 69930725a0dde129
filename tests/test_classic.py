"""The classic score functions (additive, general, dot, scaled_dot) against independent
definitions: attnlab's float64 ``reference``, PyTorch's SDPA, and a naive double loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import near_range_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import attnlab
from attnlab.contract import merge_masks

CLASSIC = ["additive", "general", "dot", "scaled_dot"]
REF64 = attnlab.create("reference", precision="float64")


def make(name, D, dtype=torch.float64, **hp):
    if name in ("additive", "general"):
        hp.setdefault("head_dim", D)
    torch.manual_seed(1234)
    return attnlab.create(name, **hp).to(dtype)


def rand(seed, B, H, Nq, Nk, D, Dv, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, H, n, d, generator=g, dtype=torch.float64).to(dtype)
           for n, d in ((Nq, D), (Nk, D), (Nk, Dv))]
    return [t.requires_grad_(grad) for t in out]


def rand_mask(seed, kind, B, H, Nq, Nk, dtype):
    """None, a bool mask (True = may attend) or an additive float mask."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "bool":
        return torch.rand(B, 1, Nq, Nk, generator=g) < 0.7
    m = torch.where(torch.rand(Nq, Nk, generator=g) < 0.7, 0.0, float("-inf"))
    return (m + 0.1 * torch.randn(Nq, Nk, generator=g)).to(dtype)


shapes = st.fixed_dictionaries({
    "B": st.integers(1, 2), "H": st.integers(1, 2), "Nq": st.integers(1, 6),
    "Nk": st.integers(1, 6), "D": st.integers(1, 5), "Dv": st.integers(1, 5),
})
mask_kinds = st.sampled_from(["none", "bool", "float"])


def grads(fn, q, k, v, seed=0):
    out = fn(q, k, v)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return [out, *torch.autograd.grad((out * w).sum(), (q, k, v))]


# ---------------------------------------------------------------- registry ---------

@pytest.mark.parametrize("name", CLASSIC)
def test_registered_flags(name):
    spec = attnlab.get(name)
    assert spec.family == "classic" and spec.exact
    assert spec.causal and spec.arbitrary_mask and spec.cross and spec.returns_weights
    assert spec.learnable == (name in ("additive", "general"))
    assert spec.equation and spec.paper.url.startswith("https://arxiv.org/abs/")
    assert name in attnlab.list_mechanisms(family="classic")


def test_aliases_and_papers():
    assert attnlab.get("luong_dot").name == "dot"
    assert attnlab.get("scaled_dot_product").name == "scaled_dot"
    assert "1409.0473" in attnlab.get("additive").paper.url
    assert "1508.04025" in attnlab.get("general").paper.url
    assert "1508.04025" in attnlab.get("dot").paper.url
    assert "1706.03762" in attnlab.get("scaled_dot").paper.url


# --------------------------------------------------------------- scaled_dot / dot ---

@settings(max_examples=40, deadline=None)
@given(s=shapes, kind=mask_kinds, causal=st.booleans(), seed=st.integers(0, 10_000))
def test_scaled_dot_equals_reference_and_sdpa(s, kind, causal, seed):
    q, k, v = rand(seed, **s, dtype=torch.float32, grad=True)
    mask = rand_mask(seed, kind, s["B"], s["H"], s["Nq"], s["Nk"], torch.float32)
    mech = attnlab.create("scaled_dot")
    got = grads(lambda q, k, v: mech(q, k, v, attn_mask=mask, is_causal=causal), q, k, v)
    ref = grads(lambda q, k, v: REF64(q, k, v, attn_mask=mask, is_causal=causal), q, k, v)
    merged = merge_masks(mask, causal, s["Nq"], s["Nk"])  # SDPA refuses mask + causal
    sdpa = grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=merged),
                 q, k, v)
    for a, b, c in zip(got, ref, sdpa, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(s=shapes, kind=mask_kinds, causal=st.booleans(), seed=st.integers(0, 10_000),
       scale=st.sampled_from([None, 0.3, 2.0]))
def test_dot_equals_reference_with_unit_scale(s, kind, causal, seed, scale):
    q, k, v = rand(seed, **s)
    mask = rand_mask(seed, kind, s["B"], s["H"], s["Nq"], s["Nk"], torch.float64)
    got, w = attnlab.create("dot")(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                   need_weights=True)
    want, w_ref = REF64(q, k, v, attn_mask=mask, is_causal=causal,
                        scale=1.0 if scale is None else scale, need_weights=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)


def test_scaled_dot_explicit_scale_replaces_default():
    q, k, v = rand(0, 1, 2, 4, 5, 3, 2)
    a = attnlab.create("scaled_dot")(q, k, v, scale=0.7)
    torch.testing.assert_close(a, REF64(q, k, v, scale=0.7))
    b = attnlab.create("scaled_dot")(q, k, v)
    torch.testing.assert_close(b, REF64(q, k, v, scale=1 / math.sqrt(3)))


# ------------------------------------------------------------------- general ---------

@settings(max_examples=25, deadline=None)
@given(s=shapes, kind=mask_kinds, causal=st.booleans(), seed=st.integers(0, 10_000))
def test_general_identity_equals_dot_and_random_Wa_identity(s, kind, causal, seed):
    q, k, v = rand(seed, **s)
    mask = rand_mask(seed, kind, s["B"], s["H"], s["Nq"], s["Nk"], torch.float64)
    kw = dict(attn_mask=mask, is_causal=causal, need_weights=True)
    eye = make("general", s["D"], init="identity")
    torch.testing.assert_close(eye(q, k, v, **kw), attnlab.create("dot")(q, k, v, **kw),
                               rtol=1e-12, atol=1e-12)
    gen = make("general", s["D"])  # xavier: a random W_a
    W_a = gen.W_a.detach()
    out, w = gen(q, k, v, **kw)
    # score_ij = q_i^T W_a k_j = (q W_a)_i . k_j, i.e. reference on q' = q W_a, scale 1.
    want, w_ref = REF64(q @ W_a, k, v, attn_mask=mask, is_causal=causal, scale=1.0,
                        need_weights=True)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
    if kind == "none" and not causal:
        scores = torch.einsum("bhid,de,bhje->bhij", q, W_a, k)
        torch.testing.assert_close(w, torch.softmax(scores, -1), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ additive ---------

def naive_additive(q, k, v, W_a, U_a, v_a, mask=None, is_causal=False, scale=1.0):
    """e_ij = v_a^T tanh(W_a q_i + U_a k_j), one pair at a time, then a plain softmax."""
    B, H, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    out = torch.zeros(B, H, Nq, Dv, dtype=torch.float64)
    wts = torch.zeros(B, H, Nq, Nk, dtype=torch.float64)
    full = None if mask is None else mask.expand(B, H, Nq, Nk)
    for b in range(B):
        for h in range(H):
            for i in range(Nq):
                e = []
                for j in range(Nk):
                    x = (W_a @ q[b, h, i] + U_a @ k[b, h, j]).tanh()
                    s = float(v_a @ x) * scale
                    if full is not None:
                        if full.dtype == torch.bool:
                            s = s if bool(full[b, h, i, j]) else -math.inf
                        else:
                            s = s + float(full[b, h, i, j])
                    if is_causal and j > i:
                        s = -math.inf
                    e.append(s)
                if all(x == -math.inf for x in e):
                    continue  # fully masked row: zeros
                m = max(e)
                p = [math.exp(x - m) for x in e]
                z = sum(p)
                for j in range(Nk):
                    wts[b, h, i, j] = p[j] / z
                    out[b, h, i] += (p[j] / z) * v[b, h, j]
    return out, wts


@settings(max_examples=20, deadline=None)
@given(s=shapes, kind=mask_kinds, causal=st.booleans(), seed=st.integers(0, 10_000),
       hidden=st.sampled_from([None, 1, 7]), scale=st.sampled_from([None, 0.5]))
def test_additive_equals_naive_double_loop(s, kind, causal, seed, hidden, scale):
    q, k, v = rand(seed, **s)
    mask = rand_mask(seed, kind, s["B"], s["H"], s["Nq"], s["Nk"], torch.float64)
    mech = make("additive", s["D"], hidden_dim=hidden, chunk_size=2)
    assert mech.W_a.shape == (hidden or s["D"], s["D"])
    out, w = mech(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, need_weights=True)
    p = {n: t.detach() for n, t in mech.named_parameters()}
    want, w_ref = naive_additive(q, k, v, p["W_a"], p["U_a"], p["v_a"], mask, causal,
                                 1.0 if scale is None else scale)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_additive_chunking_does_not_change_the_result(causal):
    q, k, v = rand(3, 2, 2, 7, 5, 4, 3)
    mask = rand_mask(3, "bool", 2, 2, 7, 5, torch.float64)
    results = []
    for chunk in (1, 3, 7, 100):
        mech = make("additive", 4, hidden_dim=6, chunk_size=chunk)
        results.append(mech(q, k, v, attn_mask=mask, is_causal=causal, need_weights=True))
    for out, w in results[1:]:
        # Rows are computed independently: identical up to float64 rounding.
        torch.testing.assert_close(out, results[0][0], rtol=0, atol=1e-14)
        torch.testing.assert_close(w, results[0][1], rtol=0, atol=1e-14)


# --------------------------------------------------------------- gradcheck -----------

@pytest.mark.parametrize("name", ["additive", "general"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_inputs_and_parameters(name, causal):
    q, k, v = rand(5, 1, 2, 4, 3, 3, 2, grad=True)
    extra = {"hidden_dim": 5, "chunk_size": 3} if name == "additive" else {}
    mech = make(name, 3, **extra)
    names = [n for n, _ in mech.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in mech.parameters()]
    mask = torch.tensor([[True, False, True]] * 4)

    def fn(q, k, v, *ps):
        return functional_call(mech, dict(zip(names, ps, strict=True)), (q, k, v),
                               {"attn_mask": mask, "is_causal": causal})

    assert torch.autograd.gradcheck(fn, (q, k, v, *params))


# ------------------------------------------------------- masks, weights, dropout -----

@pytest.mark.parametrize("name", CLASSIC)
def test_fully_masked_rows_give_zeros_and_finite_grads(name):
    q, k, v = rand(9, 2, 2, 4, 5, 3, 2, grad=True)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1] = False
    mech = make(name, 3)
    out, w = mech(q, k, v, attn_mask=mask, need_weights=True)
    assert (out[..., 1, :] == 0).all() and (w[..., 1, :] == 0).all()
    torch.testing.assert_close(w.sum(-1)[..., [0, 2, 3]], torch.ones(2, 2, 3, dtype=w.dtype))
    out.sum().backward()
    for t in (q, k, v, *mech.parameters()):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[..., 1, :] == 0).all()


@pytest.mark.parametrize("name", CLASSIC)
def test_need_weights_and_default_scale(name):
    q, k, v = rand(11, 1, 3, 4, 6, 5, 2)
    mech = make(name, 5)
    out = mech(q, k, v)
    out2, w = mech(q, k, v, need_weights=True)
    assert out.shape == (1, 3, 4, 2) and w.shape == (1, 3, 4, 6)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(w @ v, out)
    default = 1 / math.sqrt(5) if name == "scaled_dot" else 1.0
    torch.testing.assert_close(mech(q, k, v, scale=default), out)


@pytest.mark.parametrize("name", CLASSIC)
def test_dropout_acts_on_the_weights(name):
    q, k, v = rand(12, 1, 2, 5, 6, 3, 4)
    mech = make(name, 3)
    _, w = mech(q, k, v, need_weights=True)
    torch.manual_seed(0)
    out, w_d = mech(q, k, v, dropout_p=0.4, need_weights=True)
    torch.manual_seed(0)
    want = F.dropout(w, 0.4) @ v
    torch.testing.assert_close(w_d, w)  # the returned weights are before dropout
    torch.testing.assert_close(out, want)
    assert not torch.allclose(out, mech(q, k, v))


# ---------------------------------------------------------------- half precision -----

# Stated tolerance: float16 ~3 decimal digits, bfloat16 ~2; outputs are averages of
# N(0, 1) values, so an absolute error of 2e-2 (fp16) / 8e-2 (bf16) is loose but meaningful.
HALF_TOL = {torch.float16: 2e-2, torch.bfloat16: 8e-2}


@pytest.mark.parametrize("name", CLASSIC)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_and_is_close(name, dtype):
    q, k, v = rand(13, 2, 2, 9, 11, 8, 4)
    mask = rand_mask(13, "bool", 2, 2, 9, 11, torch.float64)
    mech = make(name, 8, dtype=torch.float32)
    if name == "general":
        with torch.no_grad():  # keep the bilinear scores O(1) so fp16 rounding stays small
            mech.W_a.mul_(0.5)
    half_out = mech(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, is_causal=True)
    assert half_out.dtype == dtype and torch.isfinite(half_out).all()
    want = copy.deepcopy(mech).double()(q, k, v, attn_mask=mask, is_causal=True)
    err = (half_out.double() - want).abs().max().item()
    assert err < HALF_TOL[dtype], f"{name} {dtype}: max abs error {err}"


@pytest.mark.parametrize("name", ["dot", "general", "scaled_dot"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_scores_beyond_float16_range(name, dtype):
    # |q|^2 ~ |k|^2 ~ 1e5, one direction per head: q . k ~ 1e5 > 65504, float16's max. The
    # scores (and the weights) must be formed in float32, at the mechanism's default scale.
    q, k, v = near_range_inputs(dtype, N=9, D=16, Dv=4, seed=5)
    mech = make(name, 16, dtype=dtype)  # general: a random (xavier) W_a
    out, w = mech(q, k, v, need_weights=True)
    assert out.dtype == w.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(w).all(), f"{name}: NaN/inf in {dtype}"
    scale = 16 ** -0.5 if name == "scaled_dot" else 1.0
    q64, k64 = q.double(), k.double()
    if name == "general":
        q64 = q64 @ mech.W_a.double()
    p = torch.softmax(q64 @ k64.transpose(-2, -1) * scale, dim=-1)  # independent, float64
    # Only the final rounding to dtype remains: a few units in its last place.
    tol = 4 * torch.finfo(dtype).eps
    assert (w.double() - p).abs().max() <= tol
    assert (out.double() - p @ v.double()).abs().max() <= tol * v.double().abs().max()


# ------------------------------------------------------------------- bad inputs ------

def test_additive_requires_head_dim():
    for name in ("additive", "general"):
        with pytest.raises(ValueError, match="head_dim"):
            attnlab.create(name)


@pytest.mark.parametrize("name", ["additive", "general"])
def test_head_dim_mismatch_is_a_clear_error(name):
    mech = attnlab.create(name, head_dim=4)
    q, k, v = rand(0, 1, 1, 3, 3, 5, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"head dim 5 .*head_dim=4"):
        mech(q, k, v)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="chunk_size"):
        attnlab.create("additive", head_dim=4, chunk_size=0)
    with pytest.raises(ValueError, match="hidden_dim"):
        attnlab.create("additive", head_dim=4, hidden_dim=0)
    with pytest.raises(ValueError, match="init"):
        attnlab.create("general", head_dim=4, init="orthogonal")
    with pytest.raises(TypeError, match="head_dim"):
        attnlab.create("dot", head_dim=4)


@pytest.mark.parametrize("name", ["additive", "general"])
def test_functional_api_refuses_learnable(name):
    q, k, v = rand(0, 1, 1, 3, 3, 4, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"attnlab\.create"):
        attnlab.attention(q, k, v, mechanism=name)


@pytest.mark.parametrize("name", ["dot", "scaled_dot", "luong_dot", "scaled_dot_product"])
def test_functional_api_runs_parameter_free(name):
    q, k, v = rand(0, 1, 2, 3, 4, 4, 2, dtype=torch.float32)
    out = attnlab.attention(q, k, v, mechanism=name, is_causal=True)
    scale = 1 / math.sqrt(4) if "scaled" in name else 1.0
    torch.testing.assert_close(out, REF64(q, k, v, is_causal=True, scale=scale))
