"""Lightweight and dynamic convolutions (Wu et al. 2019) against their own equations.

The reference here is the paper's formula written tap by tap in pure Python loops
(``out_i = sum_j softmax(W)_j v_{i + j - ceil((k+1)/2)}``, causal ``v_{i + j - k}``), in
float64, over random shapes, kernel sizes, heads, padding and scales (hypothesis), with
``gradcheck`` for the gradients. Then the defining properties: a one-hot kernel is the
identity or a shift, one kernel shared by the channels of a head (and, lightweight, by
every position), a dynamic kernel that depends on its own token only, no future in the
causal form, padded keys contributing nothing (no renormalisation), DropConnect on the
kernel, O(N k) memory, and the errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LargestTensor, saved_numels
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
import attnlab.mechanisms.convolution  # noqa: F401  (registers the family)
from attnlab.mechanisms.convolution import (
    dynamic_conv_reference,
    lightweight_conv_reference,
)
from attnlab.verify import verify

NAMES = ["dynamic_conv", "lightweight_conv"]
TIGHT = dict(rtol=1e-10, atol=1e-12)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def make(name, k=5, H=2, D=4, seed=0):
    torch.manual_seed(seed)
    return attnlab.create_for(name, head_dim=D, num_heads=H, kernel_size=k).double()


# ---------------------------------------------------------------- the independent formula
def kernels(mech, q, scale):
    """``w[b][h][i]``: the normalised k taps of query i (lightweight: the same for all)."""
    W = mech.weight.detach().double()
    B, H, N, _ = q.shape
    if mech.spec.name == "lightweight_conv":
        w = torch.softmax(W * scale, dim=-1)
        return [[[w[h].tolist() for _ in range(N)] for h in range(H)] for _ in range(B)]
    out = []
    for b in range(B):
        out.append([[torch.softmax(scale * (W[h] @ q[b, h, i].double()), dim=0).tolist()
                     for i in range(N)] for h in range(H)])
    return out


def paper_conv(mech, q, v, *, causal=False, keep=None, scale=1.0):
    """The paper's DepthwiseConv with softmax-normalised taps, one loop per term; taps
    outside the sequence and padded keys (``keep`` ``(B, N)`` False) read zero."""
    B, H, N, Dv = v.shape
    k = mech.hp["kernel_size"]
    w = kernels(mech, q, scale)
    out = torch.zeros(B, H, N, Dv, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                for j in range(1, k + 1):
                    src = i + j - k if causal else i + j - math.ceil((k + 1) / 2)
                    if 0 <= src < N and (keep is None or keep[b, src]):
                        out[b, h, i] += w[b][h][i][j - 1] * v[b, h, src].double()
    return out


def test_the_family_is_registered_with_truthful_flags():
    assert attnlab.list_mechanisms(family="convolution") == NAMES
    for name in NAMES:
        s = attnlab.get(name)
        assert s.learnable and s.exact and s.causal and s.key_padding and s.returns_weights
        assert not s.arbitrary_mask and not s.cross and not s.kv_cache
        assert "N^2" not in s.memory


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 12), k=st.integers(1, 8), H=st.integers(1, 3), Dv=st.integers(1, 3),
       causal=st.booleans(), pad=st.booleans(), scale=st.sampled_from([None, 0.5, 2.0]),
       seed=st.integers(0, 2**16))
def test_equals_the_papers_formula(name, N, k, H, Dv, causal, pad, scale, seed):
    mech = make(name, k=k, H=H, seed=seed)
    q, kk = rand(2, H, N, 4, seed=seed), rand(2, H, N, 4, seed=seed + 1)
    v = rand(2, H, N, Dv, seed=seed + 2)
    keep = None
    if pad:
        keep = torch.rand(2, N, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask = None if keep is None else keep[:, None, None, :]
    out, A = mech(q, kk, v, attn_mask=mask, is_causal=causal, scale=scale, need_weights=True)
    want = paper_conv(mech, q, v, causal=causal, keep=keep, scale=1.0 if scale is None else scale)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(A @ v, want, **TIGHT)  # the weights are the band: out = A v
    if not pad:  # the gate's dense reference (in the module) is this same formula
        ref = (lightweight_conv_reference if name == "lightweight_conv"
               else dynamic_conv_reference)
        torch.testing.assert_close(ref(q, kk, v, mech=mech, scale=scale, is_causal=causal),
                                   want, **TIGHT)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_are_exact(name, causal):
    mech = make(name, k=3, H=1, D=3)
    q, k = (rand(1, 1, 5, 3, seed=i).requires_grad_() for i in range(2))
    v = rand(1, 1, 5, 2, seed=2).requires_grad_()
    keep = torch.tensor([[True, True, False, True, True]])[:, None, None, :]

    def f(q, v, weight):
        return torch.func.functional_call(mech, {"weight": weight}, (q, k, v),
                                          dict(attn_mask=keep, is_causal=causal))

    w = mech.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (q, v, w))
    # k is used by neither, q not by lightweight_conv: exact zeros, never None
    out = mech(q, k, v, is_causal=causal)
    gq, gk = torch.autograd.grad(out.square().sum(), (q, k))
    assert (gk == 0).all()
    assert (gq == 0).all() == (name == "lightweight_conv")


# ---------------------------------------------------------------- one-hot kernels
@pytest.mark.parametrize("k", [1, 3, 4, 5])
def test_a_one_hot_kernel_is_the_identity_or_a_shift(k):
    mech = make("lightweight_conv", k=k, H=1)
    v = rand(1, 1, 9, 3)
    for causal in (False, True):
        for tap in range(k):
            with torch.no_grad():
                mech.weight.zero_()
                mech.weight[0, tap] = 1e4  # softmax: exactly one tap of weight 1
            shift = tap - (k - 1) if causal else tap - k // 2   # reads v[i + shift]
            want = torch.zeros_like(v)
            for i in range(9):
                if 0 <= i + shift < 9:
                    want[..., i, :] = v[..., i + shift, :]
            torch.testing.assert_close(mech(v, v, v, is_causal=causal), want, **TIGHT)
    # the centre tap (odd k) and the last causal tap are the token itself
    with torch.no_grad():
        mech.weight.zero_()
        mech.weight[0, k // 2 if k % 2 else k - 1] = 1e4
    torch.testing.assert_close(mech(v, v, v, is_causal=k % 2 == 0), v, **TIGHT)


def test_a_zero_dynamic_map_is_a_moving_average():
    mech = make("dynamic_conv", k=3, H=1)
    with torch.no_grad():
        mech.weight.zero_()  # logits 0 for every token: uniform taps 1/3
    v = rand(1, 1, 7, 2)
    want = torch.stack([v[..., max(i - 1, 0):i + 2, :].sum(-2) / 3 for i in range(7)], dim=-2)
    q = rand(1, 1, 7, 4)
    torch.testing.assert_close(mech(q, q, v), want, **TIGHT)


# ---------------------------------------------------------------- what is shared, what is not
@pytest.mark.parametrize("name", NAMES)
def test_one_kernel_per_head_shared_by_its_channels(name):
    mech = make(name, k=5, H=3)
    q, v = rand(2, 3, 10, 4, seed=1), rand(2, 3, 10, 6, seed=2)
    out, A = mech(q, q, v, need_weights=True)
    for c in range(6):  # each channel alone gives the same column of the output
        torch.testing.assert_close(mech(q, q, v[..., c:c + 1]), out[..., c:c + 1], **TIGHT)
    assert not torch.allclose(A[:, 0], A[:, 1])  # heads have their own kernels
    if name == "lightweight_conv":  # one kernel for every batch entry and position
        assert torch.equal(A[0], A[1])
        interior = torch.stack([A[0, :, i, i - 2:i + 3] for i in range(2, 8)])
        torch.testing.assert_close(interior, interior[:1].expand_as(interior), **TIGHT)
        torch.testing.assert_close(interior[0].sum(-1), torch.ones(3, dtype=torch.float64))


def test_lightweight_ignores_q_and_k():
    mech = make("lightweight_conv")
    v = rand(2, 2, 8, 4)
    torch.testing.assert_close(mech(rand(2, 2, 8, 4, seed=5), rand(2, 2, 8, 4, seed=6), v),
                               mech(rand(2, 2, 8, 4, seed=7), rand(2, 2, 8, 4, seed=8), v),
                               rtol=0, atol=0)


def test_the_dynamic_kernel_is_its_own_tokens():
    mech = make("dynamic_conv", k=5)
    q, v = rand(1, 2, 10, 4, seed=1), rand(1, 2, 10, 4, seed=2)
    out = mech(q, q, v)
    for i in (0, 4, 9):
        q2 = q.clone()
        q2[..., i, :] = rand(1, 2, 4, seed=10 + i)
        changed = (mech(q2, q, v) - out).abs().amax(dim=(0, 1, 3)) > 0
        assert changed.tolist() == [j == i for j in range(10)]


# ---------------------------------------------------------------- causal and padding
@pytest.mark.parametrize("name", NAMES)
def test_causal_outputs_never_see_the_future(name):
    mech = make(name, k=4)
    q, k, v = (rand(2, 2, 12, 4, seed=i) for i in range(3))
    out = mech(q, k, v, is_causal=True)
    for i in range(12):
        q2, k2, v2 = (t.clone() for t in (q, k, v))
        for t in (q2, k2, v2):
            t[..., i + 1:, :] = 50 * rand(2, 2, 11 - i, 4, seed=i)
        torch.testing.assert_close(mech(q2, k2, v2, is_causal=True)[..., :i + 1, :],
                                   out[..., :i + 1, :], rtol=0, atol=0)
    # and it reads the past: a past token does change a later output
    v2 = v.clone()
    v2[..., 5, :] += 1
    assert (mech(q, k, v2, is_causal=True)[..., 6, :] != out[..., 6, :]).all()


@pytest.mark.parametrize("name", NAMES)
def test_padded_keys_contribute_nothing_and_nothing_is_renormalised(name):
    mech = make(name, k=5)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, 3] = keep[1, 6:] = False
    mask = keep[:, None, None, :]
    q, v = rand(2, 2, 8, 4, seed=1), rand(2, 2, 8, 4, seed=2)
    out, A = mech(q, q, v, attn_mask=mask, need_weights=True)
    v2 = torch.where(keep[:, None, :, None], v, 1e3 * rand(2, 2, 8, 4, seed=3))
    torch.testing.assert_close(mech(q, q, v2, attn_mask=mask), out, rtol=0, atol=0)
    assert (A[0, :, :, 3] == 0).all() and (A[1, :, :, 6:] == 0).all()
    # the unpadded kernel, with the padded taps dropped: rows that lose a tap sum to < 1
    _, A_full = mech(q, q, v, need_weights=True)
    torch.testing.assert_close(A, A_full * keep[:, None, None, :], **TIGHT)
    assert (A[0, :, 4].sum(-1) < A_full[0, :, 4].sum(-1) - 1e-6).all()
    gv, = torch.autograd.grad((mech(q, q, v.requires_grad_(), attn_mask=mask) ** 2).sum(), v)
    assert (gv[0, :, 3] == 0).all() and (gv[1, :, 6:] == 0).all()


# ---------------------------------------------------------------- dropout on the kernel
def test_lightweight_dropconnect_drops_one_kernel_per_head():
    mech = make("lightweight_conv", k=5, H=2)
    v = torch.ones(3, 2, 20, 1, dtype=torch.float64)
    torch.manual_seed(0)
    out = mech(v, v, v, dropout_p=0.5)[..., 0]
    interior = out[..., 2:-2]  # every tap inside: the sum of the surviving taps
    assert torch.equal(interior, interior[:1, :, :1].expand_as(interior))  # one draw per head
    torch.manual_seed(0)
    dropped = torch.nn.functional.dropout(torch.softmax(mech.weight, -1), 0.5)
    torch.testing.assert_close(interior[0, :, 0], dropped.sum(-1), **TIGHT)


def test_dynamic_dropconnect_draws_per_token():
    mech = make("dynamic_conv", k=5, H=1)
    v = torch.ones(1, 1, 40, 1, dtype=torch.float64)
    q = rand(1, 1, 40, 4)
    torch.manual_seed(0)
    out = mech(q, q, v, dropout_p=0.5)[0, 0, 2:-2, 0]
    torch.manual_seed(0)
    w = torch.softmax(torch.einsum("nc,tc->nt", q[0, 0], mech.weight[0]), -1)
    want = torch.nn.functional.dropout(w, 0.5).sum(-1)[2:-2]
    torch.testing.assert_close(out, want, **TIGHT)
    assert len(set(out.tolist())) > 10
    torch.testing.assert_close(mech(q, q, v)[0, 0, 2:-2, 0], torch.ones(36, dtype=torch.float64),
                               **TIGHT)  # p = 0: every tap kept, the taps sum to 1


# ---------------------------------------------------------------- cost
@pytest.mark.parametrize("name", NAMES)
def test_memory_is_linear_in_n(name):
    N, k = 2048, 7
    mech = make(name, k=k).float()
    q, kk, v = (torch.randn(1, 2, N, 4, requires_grad=True) for _ in range(3))
    with LargestTensor() as mode, saved_numels() as saved:
        mech(q, kk, v, is_causal=True).sum().backward()
    bound = 2 * (N + k) * max(k, 4)  # B H (N + pad) max(k, Dv): the padded v, the taps
    assert mode.largest <= bound < N * N / 100, mode.largest
    assert max(saved) <= bound, max(saved)


# ---------------------------------------------------------------- the gate and half precision
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_the_gate_passes_and_sees_a_wrong_scale(name, causal, monkeypatch):
    for dtype in (torch.float32, torch.float64):
        assert verify(name, causal=causal, dtype=dtype, n=33).ok
    cls = attnlab.get(name).cls
    real = cls._attend
    monkeypatch.setattr(cls, "_attend", lambda self, q, k, v, m, c, s, *a:
                        real(self, q, k, v, m, c, 2 * s, *a))
    assert not verify(name, causal=causal).ok


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_is_computed_in_float32(name, dtype):
    mech = make(name).float()
    q, v = (rand(2, 2, 16, 4, seed=i).to(dtype) for i in range(2))
    out = mech.to(dtype)(q, q, v)
    assert out.dtype == dtype
    want = paper_conv(mech, q.double(), v.double())
    tol = 2e-2 if dtype == torch.float16 else 5e-2  # the weights' own rounding to dtype
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad,exc,pattern", [
    (0, ValueError, r"'kernel_size' must be >= 1; got 0"),
    (-3, ValueError, r"'kernel_size' must be >= 1; got -3"),
    (2.5, TypeError, r"'kernel_size' must be an int; got float 2.5"),
    (True, TypeError, r"'kernel_size' must be an int; got bool True"),
    ("3", TypeError, r"'kernel_size' must be an int; got str '3'"),
])
def test_bad_kernel_size_is_refused(name, bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        attnlab.create_for(name, head_dim=4, num_heads=2, kernel_size=bad)


@pytest.mark.parametrize("name", NAMES)
def test_call_errors_name_what_is_wrong(name):
    mech = make(name, H=2, D=4)
    x = rand(1, 3, 8, 4)
    with pytest.raises(ValueError, match=rf"{name}: num_heads=2 .* does not match the H=3 "
                                         r"heads of q; build it with num_heads=3"):
        mech(x, x, x)
    x = rand(1, 2, 8, 4)
    with pytest.raises(ValueError, match=rf"{name} cannot take an arbitrary attn_mask"):
        mech(x, x, x, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=rf"{name} needs Nq == Nk"):
        mech(x[:, :, :3], x, x)
    if name == "dynamic_conv":
        y = rand(1, 2, 8, 5)
        with pytest.raises(ValueError, match=r"dynamic_conv: q head dim 5 does not match "
                                             r"head_dim=4"):
            mech(y, y, x)
    with pytest.raises(ValueError, match=r"'num_heads' is required"):
        attnlab.create(name, kernel_size=3)
