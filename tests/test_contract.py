"""The functional contract, checked for every registered mechanism.

Inputs are 16 tokens (Nq == Nk, so mechanisms without cross-attention qualify) and each
mechanism is built with its registered ``tiny_hparams``; flags decide which checks apply.

Fully masked rows, numerical stability, half precision, and clear errors on bad input.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from conftest import build, naive_attention_f64, softmax_equivalent_mechanisms
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab

ALL = attnlab.list_mechanisms()
MASKABLE = attnlab.list_mechanisms(arbitrary_mask=True)
HALF = attnlab.list_mechanisms(half_precision=True)
EQUIV = set(softmax_equivalent_mechanisms())


def qkv(B=2, H=2, Nq=16, Nk=16, D=4, Dv=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Nq, D, generator=g).to(dtype),
            torch.randn(B, H, Nk, D, generator=g).to(dtype),
            torch.randn(B, H, Nk, Dv, generator=g).to(dtype))


# ---------------------------------------------------------------- fully masked rows
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("name", MASKABLE)
def test_fully_masked_row_gives_zeros_not_nan(name, kind):
    q, k, v = (t.requires_grad_() for t in qkv())
    allowed = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    allowed[0, 0, 2] = False  # batch 0, query 2: no key at all
    allowed[1, 0, 5] = False
    mask = allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(
        ~allowed, float("-inf"))
    mech = build(name, 4, 2)
    out = mech(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all(), f"{name} produced NaN/inf for a fully masked row"
    assert out[0, :, 2].abs().max() == 0 and out[1, :, 5].abs().max() == 0
    out.pow(2).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert q.grad[0, :, 2].abs().max() == 0  # a dead row has no gradient to its query
    if attnlab.get(name).returns_weights:
        _, w = mech(q, k, v, attn_mask=mask, need_weights=True)
        assert w[0, :, 2].abs().max() == 0 and torch.isfinite(w).all()


# ---------------------------------------------------------------- stability
@pytest.mark.parametrize("name", ALL)
def test_logits_of_magnitude_1e4_stay_finite(name):
    q, k, v = qkv(D=4)
    q = q / q.norm(dim=-1, keepdim=True) * 100.0
    k = k / k.norm(dim=-1, keepdim=True) * 100.0  # |q.k| up to 1e4
    mech = build(name, 4, 2)
    out = mech(q, k, v, scale=1.0)
    assert torch.isfinite(out).all()
    if name in EQUIV:
        # Near one-hot softmax: float32 score rounding (1e4 * 2^-24 ~ 6e-4) bounds the error.
        torch.testing.assert_close(out.double(), naive_attention_f64(q, k, v, scale=1.0),
                                   rtol=0, atol=5e-3)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("name", HALF)
def test_half_precision(name, dtype, tol):
    q, k, v = qkv(dtype=dtype)
    mask = torch.rand(16, 16, generator=torch.Generator().manual_seed(1)) < 0.8
    spec = attnlab.get(name)
    mech = build(name, 4, 2).to(dtype)
    out = mech(q, k, v, attn_mask=mask if spec.arbitrary_mask else None)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if name in EQUIV:
        # Inputs are exactly representable in float16/bfloat16, so the only error is the
        # mechanism's own rounding: tol is a few units in the last place of |out| <= ~3.
        expected = naive_attention_f64(q, k, v, mask if spec.arbitrary_mask else None,
                                       scale=mech.default_scale(4))
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


# ---------------------------------------------------------------- bad input
BAD = [
    ("q rank", lambda q, k, v: dict(q=q[0]), ValueError, r"q must be 4-D .*got 3-D"),
    ("batch", lambda q, k, v: dict(k=k[:1], v=v[:1]), ValueError, r"k batch size 1 .* q batch size 2"),
    ("heads", lambda q, k, v: dict(k=k[:, :1], v=v[:, :1]), ValueError, r"k has 1 heads but q has 2"),
    ("head dim", lambda q, k, v: dict(k=k[..., :3]), ValueError, r"k head dim 3 does not match q head dim 4"),
    ("v length", lambda q, k, v: dict(v=v[:, :, :5]), ValueError, r"v length 5 does not match k length 16"),
    ("dtype", lambda q, k, v: dict(k=k.double()), TypeError, r"k dtype torch.float64 does not match q dtype torch.float32"),
    ("int", lambda q, k, v: dict(q=q.long(), k=k.long(), v=v.long()), TypeError, r"q must be a floating-point tensor"),
    ("mask shape", lambda q, k, v: dict(attn_mask=torch.ones(5, 8, dtype=torch.bool)), ValueError,
     r"attn_mask shape \(5, 8\) is not broadcastable to \(B, H, Nq, Nk\) = \(2, 2, 16, 16\)"),
    ("mask rank", lambda q, k, v: dict(attn_mask=torch.ones(1, 1, 1, 16, 16, dtype=torch.bool)), ValueError,
     r"attn_mask must be broadcastable .* got 5-D"),
    ("mask dtype", lambda q, k, v: dict(attn_mask=torch.ones(16, 16, dtype=torch.int64)), TypeError,
     r"attn_mask must be bool .* got dtype torch.int64"),
    ("mask float dtype", lambda q, k, v: dict(attn_mask=torch.zeros(16, 16, dtype=torch.float64)), TypeError,
     r"float attn_mask dtype torch.float64 does not match q dtype torch.float32"),
    ("scale", lambda q, k, v: dict(scale=-1.0), ValueError, r"scale must be a finite number > 0; got -1.0"),
    ("dropout", lambda q, k, v: dict(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\); got 1.5"),
    ("not tensor", lambda q, k, v: dict(v=[1, 2]), TypeError, r"v must be a torch.Tensor; got list"),
    # A truthy non-bool is no flag: "no" must not mean True.
    ("need_weights str", lambda q, k, v: dict(need_weights="no"), TypeError,
     r"need_weights must be a bool; got str 'no'"),
    ("need_weights int", lambda q, k, v: dict(need_weights=1), TypeError,
     r"need_weights must be a bool; got int 1"),
    ("is_causal str", lambda q, k, v: dict(is_causal="yes"), TypeError,
     r"is_causal must be a bool; got str 'yes'"),
    ("is_causal tensor", lambda q, k, v: dict(is_causal=torch.tensor(True)), TypeError,
     r"is_causal must be a bool; got Tensor"),
    ("enable_gqa str", lambda q, k, v: dict(enable_gqa="yes"), TypeError,
     r"enable_gqa must be a bool; got str 'yes'"),
    ("gqa hint", lambda q, k, v: dict(k=k[:, :1], v=v[:, :1]), ValueError,
     r"k has 1 heads but q has 2 .*; pass enable_gqa=True for grouped-query heads"),
    ("gqa more kv heads", lambda q, k, v: dict(k=k.repeat(1, 2, 1, 1), v=v.repeat(1, 2, 1, 1),
                                               enable_gqa=True), ValueError,
     r"enable_gqa=True needs q's heads to be a multiple of k's; got 2 query heads and 4 k heads"),
    ("gqa v heads", lambda q, k, v: dict(q=q.repeat(1, 2, 1, 1), k=k[:, :1],
                                         v=torch.cat([v, v[:, :1]], 1), enable_gqa=True),
     ValueError, r"multiple of v's; got 4 query heads and 3 v heads"),
]


@pytest.mark.parametrize("label,change,exc,pattern", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("name", ALL)
def test_bad_input_names_argument_expected_and_given(name, label, change, exc, pattern):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    args.update(change(q, k, v))
    mech = build(name, 4, 2)
    with pytest.raises(exc, match=pattern):
        mech(**args)


def test_functional_flags_must_be_bools():
    q, k, v = qkv()
    for mechanism in (None, "sdpa", "reference"):
        with pytest.raises(TypeError, match=r"need_weights must be a bool; got str 'no'"):
            attnlab.attention(q, k, v, mechanism=mechanism, need_weights="no")
        with pytest.raises(TypeError, match=r"is_causal must be a bool; got int 0"):
            attnlab.attention(q, k, v, mechanism=mechanism, is_causal=0)
    # NumPy's bools are bools: the same results as Python's.
    out = attnlab.attention(q, k, v, need_weights=np.False_, is_causal=np.True_)
    torch.testing.assert_close(out, attnlab.attention(q, k, v, is_causal=True))
    out, w = attnlab.attention(q, k, v, need_weights=np.True_)
    assert w.shape == (2, 2, 16, 16)


def test_functional_errors_are_the_same():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k has 1 heads but q has 2"):
        attnlab.attention(q, k[:, :1], v[:, :1])


def test_unknown_mechanism_suggests_close_names():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"unknown name 'refrence'; did you mean 'reference'"):
        attnlab.attention(q, k, v, mechanism="refrence")
    with pytest.raises(ValueError, match=r"did you mean 'sdpa'"):
        attnlab.get("spda")


def test_flags_are_enforced_with_the_mechanism_named():
    q, k, v = qkv()
    no_weights = attnlab.list_mechanisms(returns_weights=False)
    for name in no_weights:
        with pytest.raises(ValueError, match=rf"{name} cannot return attention weights"):
            build(name, 4, 2)(q, k, v, need_weights=True)


def test_causal_and_mask_combine_as_both():
    q, k, v = qkv()
    mask = torch.rand(16, 16, generator=torch.Generator().manual_seed(2)) < 0.6
    both = mask & torch.ones(16, 16, dtype=torch.bool).tril()
    for name in softmax_equivalent_mechanisms():
        mech = build(name, 4, 2)
        torch.testing.assert_close(mech(q, k, v, attn_mask=mask, is_causal=True, scale=0.5),
                                   mech(q, k, v, attn_mask=both, scale=0.5))


# ---------------------------------------------------------------- the signature
SDPA_ARGS = ("attn_mask", "is_causal", "scale", "dropout_p", "need_weights", "enable_gqa")


@pytest.mark.parametrize("name", ALL)
def test_everything_after_v_is_keyword_only(name):
    """SDPA's contract: ``forward(q, k, v, *, attn_mask=None, ...)``; a mask passed by
    position is a TypeError, never read as another argument."""
    mech = build(name, 4, 2)
    params = list(inspect.signature(mech.forward).parameters.values())
    assert [p.name for p in params] == ["q", "k", "v", *SDPA_ARGS]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[3:])
    q, k, v = qkv()
    for extra in (None, torch.ones(16, 16, dtype=torch.bool), True):
        with pytest.raises(TypeError, match=r"takes 4 positional arguments but 5 were given"):
            mech(q, k, v, extra)


# ---------------------------------------------------------------- grouped-query heads
def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_enable_gqa_equals_repeated_keys_and_values(name, data):
    """``enable_gqa=True`` with ``Hk, Hv`` dividing ``H`` is the mechanism on ``k, v`` whose
    heads are repeated (``torch.repeat_interleave``) to ``H``: outputs and gradients."""
    spec = attnlab.get(name)
    H = data.draw(st.sampled_from([1, 2, 4, 6]), label="H")
    Hk = data.draw(st.sampled_from(divisors(H)), label="Hk")
    Hv = data.draw(st.sampled_from(divisors(H)), label="Hv")
    causal = spec.causal and data.draw(st.booleans(), label="causal")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, 16, 4, generator=g, requires_grad=True)
    k = torch.randn(2, Hk, 16, 4, generator=g, requires_grad=True)
    v = torch.randn(2, Hv, 16, 4, generator=g, requires_grad=True)

    def run(k_, v_, **kw):  # a fresh module from the same seed: the same parameters and
        torch.manual_seed(seed)  # draws (reformer's rotations follow a call counter)
        return build(name, 4, H)(q, k_, v_, is_causal=causal, **kw)

    out = run(k, v, enable_gqa=True)
    want = run(k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hv, dim=1))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    dout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), dout, allow_unused=True)
    ref = torch.autograd.grad(want, (q, k, v), dout, allow_unused=True)
    for a, b in zip(got, ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_enable_gqa_is_a_no_op_for_equal_heads():
    q, k, v = qkv()
    for name in ALL:
        torch.manual_seed(0)
        out = build(name, 4, 2)(q, k, v, enable_gqa=True)
        torch.manual_seed(0)
        torch.testing.assert_close(out, build(name, 4, 2)(q, k, v))

