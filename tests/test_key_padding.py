"""Key padding for the mechanisms that refuse arbitrary masks.

linear, performer, cosformer, linformer, nystromformer, reformer, sinkhorn, hierarchical,
lightweight_conv and dynamic_conv take a bool key-padding mask ``(B, H, 1, Nk)`` (``True`` =
real key) and no other mask. Evidence, per family:

* every one: the content of padded positions (queries, keys and values) never changes a
  real row, and padded keys and values get zero gradient (hypothesis over batch size,
  lengths and positions of the real tokens, causal where there is a causal form);
* kernel family: exact, the real rows equal the mechanism run on the unpadded sequence
  (float64), and linear equals its naive O(N^2) form with padded columns removed;
* limit cases where the approximation is exact attention stay exact with padding, against
  an independent masked softmax: reformer with one bucket, nystromformer with m = N and
  the exact pinv, sinkhorn with one block;
* MultiheadAttention passes key_padding_mask to all of them; they train (finite gradients);
  every other mask is still refused with the existing message.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import build, naive_attention_f64
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.mechanisms.base import is_key_padding_mask
from attnlab.nn import MultiheadAttention
from attnlab.registry import Paper, register_mechanism

PADDING_ONLY = ["cosformer", "deltanet", "dynamic_conv", "gla", "hierarchical",
                "lightweight_conv", "linear", "linformer", "mamba2", "nystromformer", "performer",
                "reformer", "retnet", "ring", "sinkhorn"]
KERNEL = ["linear", "performer", "cosformer"]
TIGHT = dict(atol=1e-12, rtol=1e-10)
H, D = 2, 4
# Reproducible hashing: both runs of a comparison must draw the same rotations.
EXTRA = {"reformer": {"fixed_rotations": True}, "performer": {"seed": 3}}


def mech(name, **hp):
    return build(name, head_dim=D, num_heads=H, **{**EXTRA.get(name, {}), **hp}).double()


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@st.composite
def padded_batches(draw, block=4, contiguous=False, max_blocks=4):
    """``keep`` ``(B, N)`` bool, ``N`` a multiple of ``block``. Real tokens form one block
    per row (``contiguous``) or any pattern; every row keeps at least one token."""
    B = draw(st.integers(1, 3))
    N = block * draw(st.integers(1, max_blocks))
    rows = []
    for _ in range(B):
        if contiguous:
            length = draw(st.integers(1, N))
            start = draw(st.integers(0, N - length))
            row = torch.zeros(N, dtype=torch.bool)
            row[start:start + length] = True
        else:
            row = torch.tensor(draw(st.lists(st.booleans(), min_size=N, max_size=N)))
            row[draw(st.integers(0, N - 1))] = True
        rows.append(row)
    return torch.stack(rows)


def as_mask(keep):
    return keep[:, None, None, :]


# ------------------------------------------------------------------------------ registry
def test_flags():
    assert attnlab.list_mechanisms(key_padding=True, arbitrary_mask=False) == PADDING_ONLY
    # Every mechanism pads but the Fourier mixers: each of their outputs mixes every position.
    assert attnlab.list_mechanisms(key_padding=False) == ["fnet", "global_filter"]
    for name in attnlab.list_mechanisms():
        s = attnlab.get(name)
        assert s.to_dict()["key_padding"] is s.key_padding
        if s.arbitrary_mask:
            assert s.key_padding  # a key-padding mask is one arbitrary mask
    # Derived, not copied: a spec stripped of arbitrary masks does not keep padding.
    ref = attnlab.get("reference")
    assert not dataclasses.replace(ref, arbitrary_mask=False).key_padding
    assert dataclasses.replace(attnlab.get("linear"), causal=False).key_padding


def test_registering_key_padding():
    common = dict(family="x", paper=Paper("t", "a", 2000), time="O(N)", memory="O(N)",
                  equation="-", exact=False, causal=False, cross=False, returns_weights=False)
    with pytest.raises(ValueError, match=r"key_padding=False contradicts arbitrary_mask=True"):
        register_mechanism("test_kp_bad", arbitrary_mask=True, key_padding=False, **common)
    try:
        @register_mechanism("test_kp_only", arbitrary_mask=False, key_padding=True, **common)
        class MaskedMean(attnlab.Mechanism):
            def _attend(self, q, k, v, attn_mask, is_causal, scale, dropout_p, need_weights):
                w = attn_mask[:, :, 0, :, None].to(v.dtype).expand_as(v)
                out = (w * v).sum(-2, keepdim=True) / w.sum(-2, keepdim=True)
                return out.expand(*q.shape[:-1], v.shape[-1]), None

        s = attnlab.get("test_kp_only")
        assert s.key_padding and not s.arbitrary_mask
        assert "test_kp_only" in attnlab.list_mechanisms(key_padding=True, arbitrary_mask=False)
        v = rand(1, 1, 3, 2)
        keep = torch.tensor([[True, False, True]])
        out = attnlab.attention(v, v, v, mechanism="test_kp_only", attn_mask=as_mask(keep))
        torch.testing.assert_close(out[0, 0, 0], v[0, 0, [0, 2]].mean(0))
        with pytest.raises(ValueError, match="test_kp_only cannot take an arbitrary attn_mask"):
            attnlab.attention(v, v, v, mechanism="test_kp_only",
                              attn_mask=torch.ones(3, 3, dtype=torch.bool))
    finally:
        attnlab.registry._REGISTRY.pop("test_kp_only", None)
    assert "test_kp_bad" not in attnlab.list_mechanisms()


def test_what_counts_as_a_key_padding_mask():
    assert is_key_padding_mask(torch.ones(2, 1, 1, 5, dtype=torch.bool))
    assert is_key_padding_mask(torch.ones(2, 3, 1, 5, dtype=torch.bool))
    assert is_key_padding_mask(torch.ones(1, 5, dtype=torch.bool))
    assert not is_key_padding_mask(torch.ones(2, 1, 4, 5, dtype=torch.bool))  # per query
    assert not is_key_padding_mask(torch.zeros(2, 1, 1, 5))  # float: additive
    assert not is_key_padding_mask(torch.ones(5, dtype=torch.bool))
    assert not is_key_padding_mask(None)


# ------------------------------------------------- every mechanism: padding is inert
def _perturb_padding(x, keep, seed):
    """``x`` ``(B, H, N, *)`` with new content (large, shifted) at the padded positions."""
    noise = 10 * rand(*x.shape, seed=seed) + 3
    return torch.where(keep[:, None, :, None], x, noise)


@pytest.mark.parametrize("name", PADDING_ONLY)
@settings(max_examples=12)
@given(keep=padded_batches(), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_padding_content_never_reaches_real_rows(name, keep, causal, seed):
    m = mech(name)
    causal = causal and m.spec.causal
    B, N = keep.shape
    if name == "nystromformer":
        m.hp["num_landmarks"] = min(4, N)
    q, k, v = (rand(B, H, N, D, seed=seed + i).requires_grad_() for i in range(3))
    out = m(q, k, v, attn_mask=as_mask(keep), is_causal=causal)
    assert torch.isfinite(out).all()
    q2, k2, v2 = (_perturb_padding(t.detach(), keep, seed + 7 + i) for i, t in
                  enumerate((q, k, v)))
    out2 = m(q2, k2, v2, attn_mask=as_mask(keep), is_causal=causal)
    real = keep[:, None, :].expand(B, H, N)
    torch.testing.assert_close(out2[real], out[real], **TIGHT)
    # No gradient reaches a padded key or value (from any row, padded ones included).
    w = rand(*out.shape, seed=seed + 20)
    gk, gv = torch.autograd.grad((out * w).sum(), (k, v), allow_unused=True)
    for g in (gk, gv):
        if g is not None:  # reformer's shared QK ignores k
            assert (g[~real] == 0).all()
            assert torch.isfinite(g).all()


@pytest.mark.parametrize("name", PADDING_ONLY)
def test_a_fully_padded_row_gives_zeros(name):
    m = mech(name)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1] = False
    q, k, v = (rand(2, H, 8, D, seed=i).requires_grad_() for i in range(3))
    out = m(q, k, v, attn_mask=as_mask(keep))
    if name != "nystromformer":  # its padded-row outputs are landmark mixtures of zeros
        assert (out[1] == 0).all()
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, v))


# ---------------------------------------------------------- kernel family: exact
@pytest.mark.parametrize("name", KERNEL)
@settings(max_examples=15)
@given(data=st.data(), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_padding_equals_the_unpadded_run(name, data, causal, seed):
    # cosFormer's weights depend on i - j: real tokens must stay one contiguous block
    # (linear and the Performer are position-free: any pattern compacts the same way).
    keep = data.draw(padded_batches(block=1, max_blocks=12, contiguous=name == "cosformer"))
    m = mech(name)
    B, N = keep.shape
    q, k, v = (rand(B, H, N, D, seed=seed + i) for i in range(3))
    out = m(q, k, v, attn_mask=as_mask(keep), is_causal=causal)
    for b in range(B):
        idx = keep[b].nonzero().squeeze(1)
        alone = m(*(t[b:b + 1, :, idx] for t in (q, k, v)), is_causal=causal)
        torch.testing.assert_close(out[b:b + 1, :, idx], alone, **TIGHT)


@pytest.mark.parametrize("name", ["linear", "performer"])
def test_kernel_cross_attention_with_padded_keys(name):
    m = mech(name)
    keep = torch.tensor([[True, False, True, True, False, False, True],
                         [False] * 3 + [True] * 4])
    q, k, v = rand(2, H, 5, D, seed=1), rand(2, H, 7, D, seed=2), rand(2, H, 7, D, seed=3)
    out = m(q, k, v, attn_mask=as_mask(keep))
    for b in range(2):
        alone = m(q[b:b + 1], k[b:b + 1, :, keep[b]], v[b:b + 1, :, keep[b]])
        torch.testing.assert_close(out[b:b + 1], alone, **TIGHT)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_padding_equals_its_naive_masked_form(causal):
    keep = torch.tensor([[True] * 6 + [False] * 4, [False, True] * 5])
    q, k, v = (rand(2, H, 10, D, seed=i) for i in range(3))

    def phi(x):  # elu(x) + 1 written out
        return torch.where(x > 0, x + 1.0, torch.exp(x))

    A = phi(q) @ phi(k).mT * keep[:, None, None, :]  # padded columns removed
    if causal:
        A = A * torch.ones(10, 10, dtype=torch.bool).tril()
    expected = (A @ v) / A.sum(-1, keepdim=True).clamp_min(1e-6)
    out = mech("linear")(q, k, v, attn_mask=as_mask(keep), is_causal=causal)
    torch.testing.assert_close(out, expected, **TIGHT)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_stabiliser_ignores_padded_keys(causal):
    # The key features are shifted by the max of w^T k (a constant that cancels, except
    # against kernel_eps, added after the shift). A padded key is zeroed, w^T 0 = 0: were it
    # counted, it would set the max whenever every real key has w^T k < 0. Two features
    # (fewer than D + 1 directions) make such keys possible: k with W k = -3 (1, 1).
    m = mech("performer", num_features=2, kernel_eps=0.5)
    W = m.projection.double() * (D ** -0.25)  # the features' w, scale^(1/2) folded in
    base = -3 * W.T @ torch.linalg.solve(W @ W.T, torch.ones(2, dtype=torch.float64))
    k = base + 0.1 * rand(1, H, 8, D, seed=1)
    assert (k @ W.T).amax() < -2  # every real key's features are below the padded zero's
    keep = torch.tensor([[True] * 5 + [False] * 3])
    q, v = rand(1, H, 8, D, seed=2), rand(1, H, 8, D, seed=3)
    out = m(q, k, v, attn_mask=as_mask(keep), is_causal=causal)
    alone = m(q[:, :, :5], k[:, :, :5], v[:, :, :5], is_causal=causal)
    torch.testing.assert_close(out[:, :, :5], alone, **TIGHT)
    if causal:  # leading padding: the first real key starts the running max
        keep = torch.tensor([[False] * 3 + [True] * 5])
        out = m(q, k, v, attn_mask=as_mask(keep), is_causal=True)
        alone = m(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], is_causal=True)
        torch.testing.assert_close(out[:, :, 3:], alone, **TIGHT)


# ---------------------------------------- limit cases stay exact softmax with padding
def shared_qk_allowed(keep, N, causal):
    """Reformer's key set in one bucket: real keys (j <= i if causal), itself only when
    no other key is allowed (the paper's rule), never a padded key."""
    allowed = keep[:, None, None, :].expand(keep.shape[0], 1, N, N)
    if causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    eye = torch.eye(N, dtype=torch.bool)
    others = allowed & ~eye
    return others | (eye & allowed & ~others.any(-1, keepdim=True))


@settings(max_examples=20)
@given(keep=padded_batches(block=1, max_blocks=10), causal=st.booleans(),
       n_hashes=st.integers(1, 3), shared=st.booleans(), seed=st.integers(0, 2**16))
def test_reformer_one_bucket_is_masked_softmax(keep, causal, n_hashes, shared, seed):
    causal = causal and shared  # the causal form needs shared QK
    B, N = keep.shape
    q, k, v = (rand(B, H, N, D, seed=seed + i).requires_grad_() for i in range(3))
    m = mech("reformer", bucket_size=N, n_hashes=n_hashes, shared_qk=shared)
    out = m(q, k, v, attn_mask=as_mask(keep), is_causal=causal)
    if shared:
        keys, allowed = q / q.norm(dim=-1, keepdim=True), shared_qk_allowed(keep, N, causal)
    else:
        keys, allowed = k, as_mask(keep)
    expected = naive_attention_f64(q, keys, v, allowed)
    torch.testing.assert_close(out, expected, **TIGHT)
    w = rand(*out.shape, seed=seed + 9)
    got = torch.autograd.grad((out * w).sum(), (q, v))
    want = torch.autograd.grad((expected * w).sum(), (q, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


@settings(max_examples=15)
@given(keep=padded_batches(block=1, max_blocks=10), seed=st.integers(0, 2**16))
def test_nystromformer_all_landmarks_is_masked_softmax_on_real_rows(keep, seed):
    B, N = keep.shape
    q, k, v = (rand(B, H, N, 8, seed=seed + i) for i in range(3))
    m = attnlab.create("nystromformer", num_landmarks=N, pinv="exact")
    out = m(q, k, v, attn_mask=as_mask(keep))
    expected = naive_attention_f64(q, k, v, as_mask(keep))
    real = keep[:, None, :].expand(B, H, N)
    # m = N inverts an N x N softmax kernel: accurate to about eps * its condition number.
    torch.testing.assert_close(out[real], expected[real], atol=1e-8, rtol=1e-8)


@settings(max_examples=15)
@given(keep=padded_batches(block=1, max_blocks=10), seed=st.integers(0, 2**16))
def test_sinkhorn_one_block_is_masked_softmax(keep, seed):
    B, N = keep.shape
    q, k, v = (rand(B, H, N, D, seed=seed + i) for i in range(3))
    out = mech("sinkhorn", block_size=N)(q, k, v, attn_mask=as_mask(keep))
    torch.testing.assert_close(out, naive_attention_f64(q, k, v, as_mask(keep)), **TIGHT)


def test_sinkhorn_local_part_never_attends_padding():
    # Several blocks: the block's own padded keys are masked, its sorted block is a mixture
    # in which padding weighs zero. Replacing padded values by huge ones changes nothing.
    m = mech("sinkhorn", block_size=4)
    keep = torch.tensor([[True] * 10 + [False] * 2])
    q, k, v = (rand(1, H, 12, D, seed=i) for i in range(3))
    out = m(q, k, v, attn_mask=as_mask(keep))
    v2 = torch.where(keep[:, None, :, None], v, torch.full_like(v, 1e6))
    torch.testing.assert_close(m(q, k, v2, attn_mask=as_mask(keep)), out, **TIGHT)


# -------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", PADDING_ONLY)
def test_other_masks_are_still_refused(name):
    m = mech(name)
    q = rand(2, H, 8, D)
    for mask in (torch.ones(8, 8, dtype=torch.bool),            # per query
                 torch.ones(2, 1, 8, 8, dtype=torch.bool),
                 torch.zeros(2, 1, 1, 8, dtype=torch.float64)):  # additive padding
        with pytest.raises(ValueError, match=rf"{name} cannot take an arbitrary attn_mask; "
                                             r"pass attn_mask=None"):
            m(q, q, q, attn_mask=mask)
    with pytest.raises(ValueError, match=r"attn_mask shape \(2, 1, 1, 9\) is not broadcastable"):
        m(q, q, q, attn_mask=torch.ones(2, 1, 1, 9, dtype=torch.bool))


# ----------------------------------------------------------- MultiheadAttention
E, N_MHA = 16, 12


def mha(name, **kw):
    torch.manual_seed(0)
    hp = {**attnlab.get(name).tiny_hparams, **EXTRA.get(name, {}), **kw}
    hp.pop("head_dim", None)
    return MultiheadAttention(E, H, name, max_seq_len=N_MHA, **hp).double()


def padding(B=3, N=N_MHA):
    pad = torch.zeros(B, N, dtype=torch.bool)  # torch's convention: True = pad
    pad[0, 7:] = True
    pad[1, :5] = True
    return pad


@pytest.mark.parametrize("name", PADDING_ONLY)
def test_mha_key_padding_trains(name):
    m = mha(name)
    pad = padding()
    x = rand(3, N_MHA, E, seed=1)
    causal = m.spec.causal
    y = m(x, key_padding_mask=pad, is_causal=causal)
    # The padded tokens' embeddings (hence their queries, keys and values) do not matter.
    x2 = torch.where(pad[..., None], 5 * rand(3, N_MHA, E, seed=2), x)
    torch.testing.assert_close(m(x2, key_padding_mask=pad, is_causal=causal)[~pad], y[~pad],
                               **TIGHT)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss = m(x, key_padding_mask=pad, is_causal=causal)[~pad].square().mean()
        loss.backward()
        # (reformer's shared QK ignores the keys: k_proj alone may get no gradient)
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        assert {n for n, _ in m.named_parameters()} - set(grads) <= {"k_proj.weight", "k_proj.bias"}
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert name == "lightweight_conv" or grads["q_proj.weight"].abs().sum() > 0  # q unused
        assert grads["v_proj.weight"].abs().sum() > 0
        opt.step()
    assert math.isfinite(loss.item())


@pytest.mark.parametrize("k_rows", [4, 12])
def test_linformer_fold_with_padding_equals_the_mechanism_path(k_rows):
    m = mha("linformer", k=k_rows)
    pad = padding()
    x = rand(3, N_MHA, E, seed=1)
    folded = m._length_fold(N_MHA) is not None
    y = m(x, key_padding_mask=pad)
    m._length_fold = lambda n: None  # force the unfolded path: project, zero, then mix
    torch.testing.assert_close(y, m(x, key_padding_mask=pad), **TIGHT)
    assert folded == (k_rows == 4)  # both paths were exercised across the parameters


def test_mha_refusals_for_padding_only_mechanisms():
    m = mha("linear")
    x, pad = rand(3, N_MHA, E), padding()
    with pytest.raises(TypeError, match=r"'linear' takes only bool key padding.*got dtype "
                                        r"torch.float64"):
        m(x, key_padding_mask=torch.zeros(3, N_MHA, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"cannot take arbitrary masks \(attn_mask\); "
                                         r"attn_mask needs one"):
        m(x, key_padding_mask=pad, attn_mask=torch.ones(N_MHA, N_MHA, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"positions='alibi' needs one"):
        MultiheadAttention(E, H, "linear", positions="alibi")
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Nk\)"):
        m(x, key_padding_mask=pad[:, :5])
