"""The exact family: ``flash`` against the definition, O(N) memory, dropout; and every
exact mechanism (``reference``, ``sdpa``, ``flash``) with grouped-query heads
(``enable_gqa``) against PyTorch's own SDPA. ``reference`` and ``sdpa`` are checked
against an independent float64 reference in ``test_exact_equivalence.py``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import saved_numels
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.mechanisms.exact import FlashAttentionFunction


def flash_fn(q, k, v, mask=None, causal=False, scale=None, p=0.0, bq=3, bk=4, seed=None):
    """The autograd Function directly; ``seed`` re-seeds the global RNG before each call."""
    if seed is not None:
        torch.manual_seed(seed)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return FlashAttentionFunction.apply(q, k, v, mask, causal, s, p, bq, bk)


def rand_qkv(B, H, Nq, Nk, D, Dv, dtype=torch.float64, grad=True, gen=None):
    def r(*shape):
        return torch.randn(*shape, dtype=dtype, generator=gen).requires_grad_(grad)

    return r(B, H, Nq, D), r(B, H, Nk, D), r(B, H, Nk, Dv)


def bool_mask(shape, gen=None, p_keep=0.6):
    return torch.rand(*shape, generator=gen) < p_keep


# ----------------------------------------------------------------------------- gradcheck

GRADCHECK_CASES = [
    # (name, Nq, Nk, mask kind, causal, dropout)
    ("plain", 7, 10, None, False, 0.0),
    ("bool", 7, 10, "bool", False, 0.0),
    ("float", 7, 10, "float", False, 0.0),
    ("causal_q<k", 7, 10, None, True, 0.0),
    ("causal_q>k", 10, 7, None, True, 0.0),
    ("causal+bool", 9, 9, "bool", True, 0.0),
    ("causal+float", 10, 7, "float", True, 0.0),
    ("dropout", 7, 10, None, False, 0.3),
    ("dropout+causal+float", 10, 7, "float", True, 0.3),
]


@pytest.mark.parametrize("name,Nq,Nk,kind,causal,p", GRADCHECK_CASES,
                         ids=[c[0] for c in GRADCHECK_CASES])
def test_gradcheck(name, Nq, Nk, kind, causal, p):
    g = torch.Generator().manual_seed(1)
    q, k, v = rand_qkv(1, 2, Nq, Nk, 3, 2, gen=g)
    inputs = [q, k, v]
    mask = None
    if kind == "bool":
        mask = bool_mask((2, Nq, Nk), gen=g)
        mask[:, :, 0] = True  # gradcheck is about smooth rows; dead rows are tested apart
    elif kind == "float":
        mask = torch.randn(1, Nq, Nk, dtype=torch.float64, generator=g).requires_grad_()
        inputs.append(mask)

    def f(q, k, v, *m):
        return flash_fn(q, k, v, m[0] if m else mask, causal, 0.7, p, bq=3, bk=4,
                        seed=0 if p > 0 else None)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_broadcast_float_mask():
    """A float mask broadcast over batch, heads and rows gets its gradient summed back."""
    g = torch.Generator().manual_seed(2)
    q, k, v = rand_qkv(2, 2, 7, 10, 3, 3, gen=g)
    mask = torch.randn(1, 2, 1, 10, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, v, m: flash_fn(q, k, v, m, True, 0.5, bq=3, bk=4), (q, k, v, mask)
    )


# ------------------------------------------------------------- agreement with the definition

@st.composite
def problems(draw):
    return dict(
        B=draw(st.integers(1, 2)), H=draw(st.integers(1, 3)),
        Nq=draw(st.sampled_from([1, 2, 5, 7, 16, 31, 33])),
        Nk=draw(st.sampled_from([1, 3, 8, 13, 32, 37])),
        D=draw(st.sampled_from([1, 4, 7, 16])), Dv=draw(st.sampled_from([1, 5, 8, 16])),
        bq=draw(st.sampled_from([1, 3, 8, 16, 64])), bk=draw(st.sampled_from([1, 5, 8, 32, 64])),
        causal=draw(st.booleans()), kind=draw(st.sampled_from([None, "bool", "float"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _make(pr, dtype=torch.float32):
    g = torch.Generator().manual_seed(pr["seed"])
    q, k, v = rand_qkv(pr["B"], pr["H"], pr["Nq"], pr["Nk"], pr["D"], pr["Dv"], dtype, gen=g)
    mask = None
    if pr["kind"] == "bool":
        mask = bool_mask((pr["H"], pr["Nq"], pr["Nk"]), gen=g)
        mask[..., 0] = True  # SDPA and the reference agree on dead rows; tested apart
    elif pr["kind"] == "float":
        mask = torch.randn(pr["Nq"], pr["Nk"], dtype=dtype, generator=g)
    return q, k, v, mask


def _out_and_grads(fn, q, k, v, mask, dout):
    out = fn(q, k, v, mask)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


@settings(max_examples=100, deadline=None)
@given(problems())
def test_matches_reference_and_sdpa(pr):
    q, k, v, mask = _make(pr)
    causal = pr["causal"]
    dout = torch.randn(pr["B"], pr["H"], pr["Nq"], pr["Dv"])
    flash = attnlab.create("flash", block_q=pr["bq"], block_k=pr["bk"])
    ref = attnlab.create("reference", precision="float64")
    mine = _out_and_grads(lambda *a: flash(*a[:3], attn_mask=a[3], is_causal=causal),
                          q, k, v, mask, dout)
    want = _out_and_grads(lambda *a: ref(*a[:3], attn_mask=a[3], is_causal=causal),
                          q, k, v, mask, dout)
    sdpa_mask = attnlab.contract.merge_masks(mask, causal, pr["Nq"], pr["Nk"])
    fused = _out_and_grads(lambda *a: F.scaled_dot_product_attention(*a[:3], attn_mask=a[3]),
                           q, k, v, sdpa_mask, dout)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), mine, want, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name} vs reference")
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, msg=f"{name} vs sdpa")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    g = torch.Generator().manual_seed(3)
    q, k, v = rand_qkv(2, 2, 37, 45, 16, 8, torch.float32, grad=False, gen=g)
    qh, kh, vh = (t.to(dtype).requires_grad_() for t in (q, k, v))
    mask = torch.randn(1, 2, 1, 45, generator=g)  # a per-key bias, broadcast over rows
    mh = mask.to(dtype).requires_grad_()
    out = attnlab.create("flash", block_q=8, block_k=16)(qh, kh, vh, attn_mask=mh,
                                                         is_causal=True)
    assert out.dtype == dtype
    out.float().square().sum().backward()
    assert all(t.grad.dtype == dtype for t in (qh, kh, vh, mh))
    ref = attnlab.create("reference", precision="float64")(
        *(t.float() for t in (qh, kh, vh)), attn_mask=mh.float(), is_causal=True)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_large_logits_are_stable():
    """Scores of magnitude 1e4 in float32 do not overflow the exponent."""
    g = torch.Generator().manual_seed(4)
    q, k, v = rand_qkv(1, 2, 20, 30, 8, 8, torch.float32, gen=g)
    big = 1e4 / math.sqrt(8)
    out = flash_fn(q * big, k, v, bq=6, bk=7, scale=1.0)
    ref = attnlab.create("reference", precision="float64")(q * big, k, v, scale=1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ----------------------------------------------------------------------- fully masked rows

@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zeros(kind):
    g = torch.Generator().manual_seed(5)
    q, k, v = rand_qkv(1, 2, 9, 11, 4, 3, torch.float32, gen=g)
    allowed = bool_mask((9, 11), gen=g)
    allowed[[0, 4, 8]] = False  # rows 0, 4 and 8 see no key (in different query tiles)
    allowed[[1, 2, 3, 5, 6, 7], 10] = True
    if kind == "bool":
        mask = allowed
    else:
        mask = torch.zeros(9, 11).masked_fill(~allowed, float("-inf")).requires_grad_()
    out = flash_fn(q, k, v, mask, causal=kind == "float", bq=4, bk=3)
    dead = [0, 4, 8]
    assert not torch.isnan(out).any()
    assert (out[:, :, dead] == 0).all()
    inputs = [q, k, v] + ([mask] if kind == "float" else [])
    grads = torch.autograd.grad(out.square().sum(), inputs)
    for t in grads:
        assert not torch.isnan(t).any()
    assert (grads[0][:, :, dead] == 0).all()
    if kind == "float":
        assert (grads[3][dead] == 0).all()
    # The same as the definition (and SDPA, PyTorch >= 2.5), dead rows included.
    ref = attnlab.create("reference", precision="float64")
    want = ref(q, k, v, attn_mask=mask, is_causal=kind == "float")
    torch.testing.assert_close(out, want)
    for a, b in zip(grads, torch.autograd.grad(want.square().sum(), inputs), strict=True):
        torch.testing.assert_close(a, b)
    sdpa_mask = attnlab.contract.merge_masks(mask.detach(), kind == "float", 9, 11)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, sdpa_mask))


# ---------------------------------------------------------------------------------- dropout

def test_dropout_is_deterministic_under_manual_seed():
    q, k, v = rand_qkv(1, 2, 13, 17, 4, 4, torch.float32, grad=False)
    a = flash_fn(q, k, v, p=0.5, seed=123)
    b = flash_fn(q, k, v, p=0.5, seed=123)
    c = flash_fn(q, k, v, p=0.5, seed=124)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _dropped_weights(p, seed, Nq=40, Nk=50, bq=16, bk=16):
    """With V = I the output row *is* the dropped weight row: P * keep / (1 - p)."""
    g = torch.Generator().manual_seed(6)
    q, k, _ = rand_qkv(1, 2, Nq, Nk, 4, 4, torch.float64, grad=False, gen=g)
    eye = torch.eye(Nk, dtype=torch.float64).expand(1, 2, Nk, Nk)
    w = flash_fn(q, k, eye, p=p, bq=bq, bk=bk, seed=seed)
    P = flash_fn(q, k, eye, p=0.0, bq=bq, bk=bk)
    return w, P


def test_dropout_drops_fraction_p_and_rescales_the_rest():
    p = 0.3
    w, P = _dropped_weights(p, seed=0)
    kept = w != 0
    n = kept.numel()
    frac = 1 - kept.double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)  # 5 binomial standard deviations
    torch.testing.assert_close(w[kept], P[kept] / (1 - p))
    # Tiles draw their own masks: two tiles of equal shape do not share a keep pattern.
    assert not torch.equal(kept[..., :16, :16], kept[..., 16:32, :16])


def test_dropout_is_unbiased():
    """E[dropout output] = no-dropout output, within 6 standard errors per element."""
    g = torch.Generator().manual_seed(7)
    q, k, v = rand_qkv(1, 2, 12, 15, 4, 3, torch.float64, grad=False, gen=g)
    exact = flash_fn(q, k, v, bq=5, bk=4)
    samples = torch.stack([flash_fn(q, k, v, p=0.4, bq=5, bk=4, seed=s) for s in range(600)])
    stderr = samples.std(dim=0) / math.sqrt(samples.shape[0])
    assert ((samples.mean(dim=0) - exact).abs() <= 6 * stderr + 1e-12).all()


def test_dropout_backward_uses_the_forward_mask():
    """Backward regenerates each tile's mask: grads match autograd through an explicit mask."""
    p = 0.25
    g = torch.Generator().manual_seed(8)
    q, k, v = rand_qkv(1, 2, 11, 9, 4, 9, torch.float64, gen=g)
    out = flash_fn(q, k, v, p=p, bq=4, bk=4, seed=42)
    eye = torch.eye(9, dtype=torch.float64).expand(1, 2, 9, 9)
    w = flash_fn(q.detach(), k.detach(), eye, p=p, bq=4, bk=4, seed=42)  # same keep mask
    keep = (w != 0).double() / (1 - p)
    P = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
    want = (P * keep) @ v
    torch.testing.assert_close(out, want)
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout),
                    torch.autograd.grad(want, (q, k, v), dout), strict=True):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------- memory

def test_saved_tensors_are_linear_in_n():
    """Nothing of size Nq x Nk is kept for backward: only q, k, v, O and L (all O(N D))."""
    N, B, H, D = 2048, 1, 2, 16
    q, k, v = rand_qkv(B, H, N, N, D, D, torch.float32)
    with saved_numels() as sizes:
        out = attnlab.create("flash")(q, k, v, is_causal=True)
    assert sizes, "the hook saw no saved tensor"
    assert max(sizes) <= B * H * N * D
    assert sum(sizes) <= 5 * B * H * N * D < N * N
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ---------------------------------------------------------------------------- the mechanism

def test_registered_with_its_paper():
    spec = attnlab.registry.get("flash")
    assert spec.exact and spec.causal and spec.cross and not spec.returns_weights
    assert spec.memory == "O(N)" and "2205.14135" in spec.paper.url
    assert attnlab.registry.resolve_name("online_softmax") == "flash"


def test_bad_block_size_is_named():
    with pytest.raises(ValueError, match="block_q"):
        attnlab.create("flash", block_q=0)
    with pytest.raises(ValueError, match="block_k"):
        attnlab.create("flash", block_k=0)


def test_need_weights_is_refused():
    q, k, v = rand_qkv(1, 1, 4, 4, 2, 2, torch.float32, grad=False)
    with pytest.raises(ValueError, match="weights"):
        attnlab.create("flash")(q, k, v, need_weights=True)


# ------------------------------------------------------------- grouped-query heads (GQA)
EXACT_FAMILY = attnlab.list_mechanisms(family="exact")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def gqa_problems(draw):
    """Query heads H, key and value heads each a divisor of H (SDPA allows them to differ),
    lengths, and one of: no mask, a bool or float mask (broadcast or full), causal."""
    H = draw(st.sampled_from([1, 2, 3, 4, 6]))
    Hk, Hv = draw(st.sampled_from(divisors(H))), draw(st.sampled_from(divisors(H)))
    B, Nq, Nk = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    D, Dv = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    kind = draw(st.sampled_from([None, "bool", "float", "causal"]))
    full = draw(st.booleans())
    return B, H, Hk, Hv, Nq, Nk, D, Dv, kind, full, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("name", EXACT_FAMILY)
@settings(max_examples=30, deadline=None)
@given(pr=gqa_problems())
def test_enable_gqa_equals_sdpa(name, pr):
    """Outputs and gradients (k's and v's: summed over the query heads each head serves).
    Fully masked rows (bool masks) give zeros in both, as the contract says."""
    B, H, Hk, Hv, Nq, Nk, D, Dv, kind, full, seed = pr
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()

    q, k, v = r(B, H, Nq, D), r(B, Hk, Nk, D), r(B, Hv, Nk, Dv)
    shape = (B, H, Nq, Nk) if full else (Nq, Nk)
    mask = {None: None, "causal": None, "bool": bool_mask(shape, g),
            "float": torch.randn(shape, dtype=torch.float64, generator=g)}[kind]
    kw = dict(attn_mask=mask, is_causal=kind == "causal", scale=0.7)
    out = attnlab.create(name)(q, k, v, enable_gqa=True, **kw)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(out, (q, k, v), dout)
    ref = torch.autograd.grad(want, (q, k, v), dout)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_functional_attention_takes_enable_gqa():
    g = torch.Generator().manual_seed(3)
    q, k, v = rand_qkv(2, 4, 5, 6, 3, 2, gen=g, grad=False)
    k, v = k[:, :2], v[:, :1]
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True)
    for mechanism in (None, *EXACT_FAMILY):
        torch.testing.assert_close(attnlab.attention(q, k, v, is_causal=True, enable_gqa=True,
                                                     mechanism=mechanism), want)
    out, w = attnlab.attention(q, k, v, need_weights=True, enable_gqa=True)
    torch.testing.assert_close(w @ v.repeat_interleave(4, dim=1), out)

