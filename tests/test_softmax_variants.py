"""Sigmoid attention (Ramapuram et al. 2024) and differential attention (Ye et al. 2024).

Each is checked against a dense float64 formula of its paper written plainly here (sharing
no code with the module), then on its defining property: sigmoid weights are elementwise
(a pair's weight depends on that pair alone, rows do not sum to 1, a masked pair is an
exact 0); differential attention is one softmax map when ``lambda = 0`` and ``(1 - lambda)``
times one map when both halves are equal. Gradients against ``torch.autograd.gradcheck``
(sigmoid's backward is hand-written), KV-cache decoding against the full causal forward.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LargestTensor, saved_numels
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import attnlab
import attnlab.mechanisms.softmax_variants  # noqa: F401
from attnlab.nn import KVCache, MultiheadAttention

F64 = dict(rtol=1e-10, atol=1e-12)


def draw(B, H, nq, nk, D, Dv=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, nq, D, generator=g, dtype=dtype),
            torch.randn(B, H, nk, D, generator=g, dtype=dtype),
            torch.randn(B, H, nk, Dv or D, generator=g, dtype=dtype))


def make_mask(kind, B, H, nq, nk, seed=0):
    """None, a bool (B, 1, Nq, Nk) mask or a float one with -inf and finite biases."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, 1, nq, nk, generator=g) < 0.7
    if kind == "bool":
        return keep
    bias = torch.randn(B, 1, nq, nk, generator=g, dtype=torch.float64)
    return bias.masked_fill(~keep, -math.inf)


def allowed_and_bias(mask, causal, nq, nk):
    keep = torch.ones(nq, nk, dtype=torch.bool)
    bias = torch.zeros(nq, nk, dtype=torch.float64)
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    elif mask is not None:
        keep = keep & ~torch.isneginf(mask)
        bias = torch.where(keep, mask.double(), 0.0)
    if causal:
        keep = keep & torch.ones(nq, nk, dtype=torch.bool).tril()
    return keep, bias


# ---------------------------------------------------------------- sigmoid: references
def sigmoid_f64(q, k, v, b, scale, mask=None, causal=False):
    """``(sigma(q k^T scale + b + M) V, weights)``, 0 at disallowed pairs, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    keep, bias = allowed_and_bias(mask, causal, q.shape[-2], k.shape[-2])
    logits = q @ k.transpose(-2, -1) * scale + b + bias
    w = torch.where(keep, 1.0 / (1.0 + torch.exp(-logits)), 0.0)
    return w @ v, w


def sigmoid(chunk=4, **hp):
    return attnlab.create("sigmoid", chunk_size=chunk, **hp)


def test_sigmoid_flags():
    s = attnlab.get("sigmoid")
    assert attnlab.get("sigmoid_attention") is s and s.family == "softmax_variants"
    assert not s.exact and not s.learnable
    assert s.returns_weights and s.arbitrary_mask and s.cross and s.causal and s.kv_cache
    assert s.half_precision and "N^2" not in s.memory


@settings(max_examples=30, deadline=None)
@given(nq=st.integers(1, 11), nk=st.integers(1, 11), chunk=st.integers(1, 5),
       causal=st.booleans(), kind=st.sampled_from(["none", "bool", "float"]),
       seed=st.integers(0, 2**16))
def test_sigmoid_equals_its_dense_formula(nq, nk, chunk, causal, kind, seed):
    q, k, v = draw(2, 3, nq, nk, 4, Dv=3, seed=seed)
    mask = make_mask(kind, 2, 3, nq, nk, seed)
    mech = sigmoid(chunk, max_seq_len=7)
    want, w_want = sigmoid_f64(q, k, v, -math.log(7), 0.5, mask, causal)
    out = mech(q, k, v, attn_mask=mask, is_causal=causal)  # the chunked autograd function
    out2, w = mech(q, k, v, attn_mask=mask, is_causal=causal, need_weights=True)
    torch.testing.assert_close(out, want, **F64)
    torch.testing.assert_close(out2, want, **F64)
    torch.testing.assert_close(w, w_want, **F64)


def test_sigmoid_bias_is_minus_log_n_or_given():
    q, k, v = draw(1, 2, 5, 6, 4)
    for hp, b in (({"max_seq_len": 50}, -math.log(50)), ({}, -math.log(1024)),
                  ({"bias": 0.3, "max_seq_len": 50}, 0.3)):
        _, w = sigmoid(**hp)(torch.zeros_like(q), k, v, need_weights=True)
        # q = 0: every logit is b alone.
        torch.testing.assert_close(w, torch.full_like(w, 1.0 / (1.0 + math.exp(-b))), **F64)
    out = sigmoid(bias=-1.0)(q, k, v, scale=0.7)
    torch.testing.assert_close(out, sigmoid_f64(q, k, v, -1.0, 0.7)[0], **F64)
    # create_for fills the layer's context length
    assert attnlab.create_for("sigmoid", head_dim=4, num_heads=2, max_seq_len=77).b == \
        -math.log(77)


def test_sigmoid_weights_are_elementwise_not_normalised():
    q, k, v = draw(2, 2, 8, 10, 4, seed=3)
    mech = sigmoid(3, max_seq_len=4)
    _, w = mech(q, k, v, need_weights=True)
    assert ((w.sum(-1) - 1).abs() > 1e-3).all()  # no row sums to 1
    # A pair's weight is its own: dropping keys leaves the others' weights as they were
    # (softmax would renormalise them).
    _, w5 = mech(q, k[:, :, :5], v[:, :, :5], need_weights=True)
    torch.testing.assert_close(w5, w[..., :5], **F64)


def test_sigmoid_masked_pair_contributes_exactly_zero():
    q, k, v = draw(1, 2, 6, 9, 4, seed=5)
    mask = torch.ones(6, 9, dtype=torch.bool)
    mask[2, 4] = False
    mask[3] = False  # a fully masked row
    mech = sigmoid(4)
    for kw in ({"attn_mask": mask}, {"attn_mask": torch.zeros(6, 9, dtype=torch.float64)
                                     .masked_fill(~mask, -math.inf)}):
        out, w = mech(q, k, v, need_weights=True, **kw)
        assert (w[..., 2, 4] == 0).all() and (w[..., 3, :] == 0).all()
        assert (out[..., 3, :] == 0).all() and (w[..., ~mask] == 0).all()
        v2 = v.clone()
        v2[..., 4, :] += 1e3  # only row 2 skips key 4; rows 3 (none) and 2 keep their output
        out2 = mech(q, k, v2, **kw)
        assert torch.equal(out2[..., 2:4, :], out[..., 2:4, :])
        assert not torch.equal(out2[..., 0, :], out[..., 0, :])


@pytest.mark.parametrize("causal,kind", [(False, "none"), (True, "none"), (False, "bool"),
                                         (True, "float")])
def test_sigmoid_gradients_pass_gradcheck(causal, kind):
    q, k, v = (t.requires_grad_() for t in draw(1, 2, 5, 7, 3, Dv=2, seed=7))
    mask = make_mask(kind, 1, 2, 5, 7, seed=2)
    mech = sigmoid(2, max_seq_len=3)
    assert torch.autograd.gradcheck(
        lambda q, k, v: mech(q, k, v, attn_mask=mask, is_causal=causal), (q, k, v))


def test_sigmoid_keeps_no_quadratic_tensor():
    n, c = 64, 8
    q, k, v = (t.requires_grad_() for t in draw(1, 1, n, n, 4, dtype=torch.float32))
    mech = sigmoid(c)
    with LargestTensor() as mode, saved_numels() as saved:
        out = mech(q, k, v, is_causal=True)
        out.pow(2).sum().backward()
    assert mode.largest <= c * n and max(saved) <= n * 4, (mode.largest, max(saved))
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want, _ = sigmoid_f64(q2, k2, v2, -math.log(1024), 0.5, causal=True)
    want.pow(2).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sigmoid_half_precision_is_computed_in_float32(dtype):
    q, k, v = (t.to(dtype) for t in draw(2, 2, 16, 16, 8, seed=1))
    q = q * 30  # q . k / sqrt(8) of a few hundred: no overflow in float32
    out = sigmoid(5)(q, k, v, is_causal=True)
    assert out.dtype == dtype
    want, _ = sigmoid_f64(q, k, v, -math.log(1024), 8 ** -0.5, causal=True)
    err = float((out.double() - want).abs().max() / want.abs().max())
    assert err < 2e-2 if dtype == torch.float16 else err < 5e-2, err


# ---------------------------------------------------------------- differential: references
def softmax_f64(s, keep):
    s = s.masked_fill(~keep, -math.inf)
    top = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isneginf(top), 0.0, top))
    z = e.sum(-1, keepdim=True)
    return torch.where(z > 0, e / torch.where(z > 0, z, 1.0), 0.0)


def diff_f64(q, k, v, lams, weight, lam_init, scale, mask=None, causal=False, norm=True,
             eps=1e-5):
    """``((1 - lam_init) RMSNorm((P1 - lambda P2) V), P1 - lambda P2)`` in float64."""
    q, k, v = q.double(), k.double(), v.double()
    lq1, lk1, lq2, lk2 = (t.double() for t in lams)
    d = q.shape[-1] // 2
    keep, bias = allowed_and_bias(mask, causal, q.shape[-2], k.shape[-2])
    p1 = softmax_f64(q[..., :d] @ k[..., :d].transpose(-2, -1) * scale + bias, keep)
    p2 = softmax_f64(q[..., d:] @ k[..., d:].transpose(-2, -1) * scale + bias, keep)
    lam = math.exp(float(lq1 @ lk1)) - math.exp(float(lq2 @ lk2)) + lam_init
    a = p1 - lam * p2
    out = a @ v
    if norm:
        out = (1 - lam_init) * weight.double() * out / torch.sqrt(
            (out ** 2).mean(-1, keepdim=True) + eps)
    return out, a


def differential(D=4, seed=0, **hp):
    torch.manual_seed(seed)
    mech = attnlab.create("differential", head_dim=D, **hp).double()
    with torch.no_grad():
        mech.norm_weight.add_(0.3 * torch.randn(mech.norm_weight.shape))  # not all ones
    return mech


def lams(mech):
    return [getattr(mech, f"lambda_{n}").detach() for n in ("q1", "k1", "q2", "k2")]


def test_differential_flags():
    s = attnlab.get("differential")
    assert attnlab.get("diff_attention") is s and s.family == "softmax_variants"
    assert not s.exact and s.learnable
    assert s.returns_weights and s.arbitrary_mask and s.cross and s.causal and s.kv_cache


@settings(max_examples=30, deadline=None)
@given(nq=st.integers(1, 9), nk=st.integers(1, 9), causal=st.booleans(), norm=st.booleans(),
       kind=st.sampled_from(["none", "bool", "float"]), layer=st.integers(1, 12),
       seed=st.integers(0, 2**16))
def test_differential_equals_its_dense_formula(nq, nk, causal, norm, kind, layer, seed):
    q, k, v = draw(2, 3, nq, nk, 6, seed=seed)
    mask = make_mask(kind, 2, 3, nq, nk, seed)
    mech = differential(6, seed, layer_index=layer, norm=norm)
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))
    want, a = diff_f64(q, k, v, lams(mech), mech.norm_weight.detach(), lam_init, 3 ** -0.5,
                       mask, causal, norm)
    out = mech(q, k, v, attn_mask=mask, is_causal=causal)  # two SDPA calls
    out2, w = mech(q, k, v, attn_mask=mask, is_causal=causal, need_weights=True)  # dense
    torch.testing.assert_close(out, want, **F64)
    torch.testing.assert_close(out2, want, **F64)
    torch.testing.assert_close(w, a, **F64)


def test_differential_with_lambda_zero_is_softmax_over_the_first_half():
    q, k, v = draw(2, 2, 7, 9, 8, Dv=5, seed=4)
    mech = differential(8, lambda_init=0.0, value_dim=5)
    with torch.no_grad():  # exp(0) - exp(0) + 0 = 0
        for p in lams(mech):
            p.zero_()
    assert float(mech.lam(torch.float64).detach()) == 0.0
    mask = make_mask("bool", 2, 2, 7, 9)
    one = F.scaled_dot_product_attention(q[..., :4], k[..., :4], v, attn_mask=mask,
                                         scale=0.5)  # scale 1/sqrt(D/2)
    for norm in (False, True):
        mech.hp["norm"] = norm
        out, w = mech(q, k, v, attn_mask=mask, need_weights=True)
        p = torch.softmax((q[..., :4] @ k[..., :4].transpose(-2, -1) * 0.5).masked_fill(
            ~mask, -math.inf), dim=-1)
        torch.testing.assert_close(w, p, **F64)
        want = one if not norm else one * torch.rsqrt(one.pow(2).mean(-1, keepdim=True)
                                                      + 1e-5) * mech.norm_weight.detach()
        torch.testing.assert_close(out, want, **F64)  # lambda_init = 0: the norm unscaled


def test_differential_with_equal_halves_is_one_map_times_one_minus_lambda():
    q1, k1, v = draw(1, 2, 6, 6, 3, seed=9)
    q, k = torch.cat([q1, q1], -1), torch.cat([k1, k1], -1)
    mech = differential(6, norm=False, layer_index=3)
    lam = float(mech.lam(torch.float64).detach())
    assert lam != 0 and lam == pytest.approx(
        0.8 - 0.6 * math.exp(-0.6) + sum(math.exp(float(a @ b)) * s for a, b, s in
                                         ((*lams(mech)[:2], 1), (*lams(mech)[2:], -1))))
    out, w = mech(q, k, v, is_causal=True, need_weights=True)
    p = softmax_f64(q1 @ k1.transpose(-2, -1) / math.sqrt(3),
                    torch.ones(6, 6, dtype=torch.bool).tril())
    torch.testing.assert_close(w, (1 - lam) * p, **F64)
    torch.testing.assert_close(mech(q, k, v, is_causal=True), (1 - lam) * p @ v, **F64)


@pytest.mark.parametrize("norm", [True, False])
def test_differential_gradients_pass_gradcheck(norm):
    q, k, v = (t.requires_grad_() for t in draw(1, 2, 4, 5, 4, seed=2))
    mech = differential(4, norm=norm)
    mask = make_mask("bool", 1, 2, 4, 5, seed=1)
    names = [n for n, _ in mech.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in mech.parameters()]

    def f(q, k, v, *ps):
        return functional_call(mech, dict(zip(names, ps, strict=True)), (q, k, v),
                               {"attn_mask": mask, "is_causal": True})
    assert torch.autograd.gradcheck(f, (q, k, v, *params))


def test_differential_forms_no_quadratic_tensor():
    n = 64
    q, k, v = (t.requires_grad_() for t in draw(1, 1, n, n, 4, dtype=torch.float32))
    mech = attnlab.create("differential", head_dim=4)
    with LargestTensor() as mode, saved_numels() as saved:
        mech(q, k, v, is_causal=True).sum().backward()
    assert mode.largest < n * n and max(saved) < n * n, (mode.largest, max(saved))


# ---------------------------------------------------------------- both: decoding, errors
@pytest.mark.parametrize("positions", [None, "rope"])
@pytest.mark.parametrize("name,hp", [("sigmoid", {"chunk_size": 2}), ("differential", {})])
def test_kv_cache_decoding_equals_the_full_causal_forward(name, hp, positions):
    torch.manual_seed(0)
    m = MultiheadAttention(16, 2, name, positions=positions, max_seq_len=12, **hp)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    m = m.double().eval()
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = m(x, is_causal=True)
    for sizes in ([1] * 10, [4, 1, 3, 2], [10]):
        cache, outs, t = KVCache(), [], 0
        for s in sizes:
            outs.append(m(x[:, t:t + s], kv_cache=cache))
            t += s
        torch.testing.assert_close(torch.cat(outs, 1), full, **F64)


def test_bad_hyperparameters_give_clear_errors():
    with pytest.raises(ValueError, match=r"differential: hyperparameter 'head_dim' must be a "
                                         r"multiple of 2 \(.*halves.*\); got 5"):
        attnlab.create("differential", head_dim=5)
    with pytest.raises(ValueError, match=r"'lambda_init' must be >= 0.0 and <= 1.0; got 1.5"):
        attnlab.create("differential", head_dim=4, lambda_init=1.5)
    with pytest.raises(ValueError, match=r"'layer_index' must be >= 1; got 0"):
        attnlab.create("differential", head_dim=4, layer_index=0)
    mech = attnlab.create("differential", head_dim=4)
    q, k, v = draw(1, 1, 3, 3, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"q head dim 6 does not match head_dim=4"):
        mech(q, k, v)
    q, k, v = draw(1, 1, 3, 3, 4, Dv=3, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"v head dim 3 does not match the norm's width "
                                         r"value_dim=4; create it with value_dim=3"):
        mech(q, k, v)
    with pytest.raises(ValueError, match=r"'chunk_size' must be >= 1; got 0"):
        attnlab.create("sigmoid", chunk_size=0)
    with pytest.raises(ValueError, match=r"'max_seq_len' must be >= 1; got 0"):
        attnlab.create("sigmoid", max_seq_len=0)
    with pytest.raises(ValueError, match=r"'bias' must be finite; got nan"):
        attnlab.create("sigmoid", bias=float("nan"))
