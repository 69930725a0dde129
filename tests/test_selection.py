"""Selection mechanisms against independent definitions.

* ``topk`` (Zhao et al. 2019): a float64 dense reference written here (scores, the top-k
  set from ``argsort``, explicit exp / sum over that set), SDPA for ``k >= N``, autograd
  gradients of the reference, ``gradcheck``; its defining property, exactly
  ``min(k, allowed)`` non-zero weights per query; causality; the memory it keeps.
* ``hard`` (Xu et al. 2015): every output row is one value vector, in training and eval;
  eval is the argmax; the Gumbel draws follow softmax(scores) in frequency and the
  straight-through gradient is the soft sample's; REINFORCE's surrogate reaches q and k,
  updates its baseline, and its gradient estimate is unbiased (against the exact gradient
  of the expected reward); masked and future keys are never drawn.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LargestTensor, saved_numels
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
import attnlab.mechanisms.selection  # noqa: F401
from attnlab.mechanisms.selection import total_reinforce_loss
from attnlab.nn import KVCache, MultiheadAttention

DT = torch.float64
TIGHT = dict(atol=1e-10, rtol=1e-10)


def rand(*shape, seed=0, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return t.requires_grad_(grad)


def qkv(B, H, Nq, Nk, D, Dv, seed=0, grad=False):
    return (rand(B, H, Nq, D, seed=seed, grad=grad), rand(B, H, Nk, D, seed=seed + 1, grad=grad),
            rand(B, H, Nk, Dv, seed=seed + 2, grad=grad))


def make_mask(kind, B, Nq, Nk, seed):
    """``(mask, allowed, bias)``: the mask passed, and the pairs it allows and its additive
    part, both (B, 1, Nq, Nk)."""
    g = torch.Generator().manual_seed(seed + 7)
    allowed = torch.rand(B, 1, Nq, Nk, generator=g) < 0.6
    bias = torch.zeros(B, 1, Nq, Nk, dtype=DT)
    if kind == "none":
        return None, torch.ones_like(allowed), bias
    if kind == "bool":
        return allowed, allowed, bias
    bias = 0.3 * torch.randn(B, 1, Nq, Nk, generator=g, dtype=DT)
    return bias.masked_fill(~allowed, -math.inf), allowed, bias


def allowed_pairs(allowed, Nq, Nk, causal):
    return allowed & torch.ones(Nq, Nk, dtype=torch.bool).tril() if causal else allowed


# ================================================================== topk
def topk_reference(q, k, v, keep_k, allowed, bias, scale=None):
    """softmax over the k largest allowed scores of each row, dense, in float64."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale + bias
    s = s.masked_fill(~allowed, -math.inf)
    order = s.argsort(dim=-1, descending=True)[..., :keep_k]
    keep = torch.zeros(s.shape, dtype=torch.bool).scatter(-1, order, True) & allowed
    s = s.masked_fill(~keep, -math.inf)
    row_max = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(row_max), row_max, 0.0))
    z = e.sum(-1, keepdim=True)
    p = torch.where(z > 0, e / torch.where(z > 0, z, 1.0), 0.0)
    return p @ v, p, keep


shapes = st.fixed_dictionaries({
    "B": st.integers(1, 2), "H": st.integers(1, 2), "Nq": st.integers(1, 9),
    "Nk": st.integers(1, 9), "D": st.integers(1, 5), "Dv": st.integers(1, 4),
})


@settings(max_examples=30, deadline=None)
@given(sh=shapes, keep_k=st.integers(1, 10), chunk=st.integers(1, 10),
       kind=st.sampled_from(["none", "bool", "float"]), causal=st.booleans(),
       seed=st.integers(0, 2**16))
def test_topk_equals_dense_attention_on_the_top_k_set(sh, keep_k, chunk, kind, causal, seed):
    B, H, Nq, Nk = sh["B"], sh["H"], sh["Nq"], sh["Nk"]
    q, k, v = qkv(B, H, Nq, Nk, sh["D"], sh["Dv"], seed=seed, grad=True)
    mask, allowed, bias = make_mask(kind, B, Nq, Nk, seed)
    allowed = allowed_pairs(allowed, Nq, Nk, causal)
    m = attnlab.create("topk", k=keep_k, chunk_size=chunk)
    out, w = m(q, k, v, attn_mask=mask, is_causal=causal, need_weights=True)
    ref, p, keep = topk_reference(q, k, v, keep_k, allowed, bias)
    torch.testing.assert_close(out, ref, **TIGHT)
    torch.testing.assert_close(w, p, **TIGHT)
    # The defining property: exactly min(k, allowed keys) non-zero weights per query.
    n_allowed = allowed.expand(B, H, Nq, Nk).sum(-1)
    assert torch.equal((w != 0).sum(-1), n_allowed.clamp(max=keep_k))
    assert not (w[~keep.expand_as(w)] != 0).any()
    # Gradients: those of the dense formula on the selected set (the set is locally fixed).
    g = rand(*out.shape, seed=seed + 3)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    # The same without weights (the head-sliced path) and without autograd.
    torch.testing.assert_close(m(q, k, v, attn_mask=mask, is_causal=causal), out, **TIGHT)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(7, 7), (5, 11), (11, 5)])
def test_topk_with_k_at_least_n_is_sdpa(nq, nk, causal):
    q, k, v = qkv(2, 3, nq, nk, 4, 6, seed=nq)
    mask = torch.rand(2, 1, nq, nk, generator=torch.Generator().manual_seed(1)) < 0.7
    mask[..., 0] = True  # no fully masked row (SDPA's are NaN in older torch)
    for keep_k in (nk, nk + 3):
        m = attnlab.create("topk", k=keep_k, chunk_size=3)
        for kw in (dict(is_causal=causal), dict(attn_mask=mask)):
            torch.testing.assert_close(m(q, k, v, **kw),
                                       F.scaled_dot_product_attention(q, k, v, **kw), **TIGHT)
        torch.testing.assert_close(m(q, k, v, scale=0.3),
                                   F.scaled_dot_product_attention(q, k, v, scale=0.3), **TIGHT)


def test_topk_gradient_reaches_only_the_keys_a_query_keeps():
    q, k, v = qkv(1, 2, 6, 10, 4, 3, seed=5, grad=True)
    m = attnlab.create("topk", k=3, chunk_size=4)
    _, w = m(q, k, v, need_weights=True)
    for i in range(6):
        out = m(q, k, v)
        gk, gv = torch.autograd.grad(out[:, :, i].sum(), (k, v))
        kept = w[:, :, i] != 0                                   # (B, H, Nk)
        assert kept.sum(-1).eq(3).all()
        assert (gk.abs().sum(-1)[~kept] == 0).all() and (gv.abs().sum(-1)[~kept] == 0).all()
        assert (gv.abs().sum(-1)[kept] > 0).all() and (gk.abs().sum(-1)[kept] > 0).all()


def test_topk_causal_rows_never_look_ahead():
    q, k, v = qkv(2, 2, 12, 12, 4, 4, seed=2)
    m = attnlab.create("topk", k=3, chunk_size=5)
    out, w = m(q, k, v, is_causal=True, need_weights=True)
    assert (w.triu(1) == 0).all()
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 8:] = 100 * rand(2, 2, 4, 4, seed=9)  # the future, made to dominate
    v2[:, :, 8:] = 50.0
    torch.testing.assert_close(m(q, k2, v2, is_causal=True)[:, :, :8], out[:, :, :8], **TIGHT)


def test_topk_gradcheck():
    q, k, v = qkv(1, 2, 5, 6, 3, 2, seed=11, grad=True)
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(3)) < 0.8
    m = attnlab.create("topk", k=2, chunk_size=2)
    assert torch.autograd.gradcheck(lambda a, b, c: m(a, b, c, attn_mask=mask, is_causal=True),
                                    (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: m(a, b, c), (q, k, v))


def test_topk_keeps_no_query_by_key_tensor():
    """Without autograd the largest tensor is one chunk's scores; with it, nothing (Nq, Nk)
    is saved for backward (the k kept keys are)."""
    N, c = 256, 16
    q, k, v = (t.float() for t in qkv(1, 1, N, N, 4, 4, seed=1))
    m = attnlab.create("topk", k=4, chunk_size=c)
    with torch.no_grad(), LargestTensor() as lt:
        m(q, k, v, is_causal=True)
    assert lt.largest <= c * N < N * N
    q.requires_grad_()
    with saved_numels() as sizes:
        out = m(q, k, v, is_causal=True)
    assert max(sizes) <= c * N // 4  # q, k^T, indices, weights, gathered values
    out.sum().backward()


def test_topk_bad_hyperparameters():
    with pytest.raises(ValueError, match=r"topk: hyperparameter 'k' must be >= 1; got 0"):
        attnlab.create("topk", k=0)
    with pytest.raises(TypeError, match=r"'k' must be an int; got float 2.5"):
        attnlab.create("topk", k=2.5)
    with pytest.raises(TypeError, match=r"'k' must be an int; got bool True"):
        attnlab.create("topk", k=True)
    with pytest.raises(ValueError, match=r"'chunk_size' must be >= 1; got 0"):
        attnlab.create("topk", chunk_size=0)


# ================================================================== decoding (both)
@pytest.mark.parametrize("name,hp", [("topk", dict(k=3, chunk_size=2)), ("hard", {})])
def test_decoding_with_a_kv_cache_equals_the_causal_forward(name, hp):
    torch.manual_seed(0)
    m = MultiheadAttention(16, 4, name, max_seq_len=16, **hp).double().eval()
    x = rand(2, 11, 16, seed=4)
    full = m(x, is_causal=True)
    for sizes in ([1] * 11, [4, 1, 3, 3], [6, 5]):
        cache, outs, t = KVCache(), [], 0
        for s in sizes:
            outs.append(m(x[:, t:t + s], kv_cache=cache))
            t += s
        torch.testing.assert_close(torch.cat(outs, dim=1), full, **TIGHT)


# ================================================================== hard
def hard(**hp):
    return attnlab.create("hard", **hp)


def selected(out, v):
    """``(B, H, Nq, Nk)`` bool: which value vectors each output row equals exactly."""
    return (out.unsqueeze(-2) == v.unsqueeze(-3)).all(-1)


@settings(max_examples=25, deadline=None)
@given(sh=shapes, mode=st.sampled_from(["gumbel", "reinforce", "eval"]),
       kind=st.sampled_from(["none", "bool", "float"]), causal=st.booleans(),
       chunk=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_hard_rows_are_one_allowed_value_vector(sh, mode, kind, causal, chunk, seed):
    B, H, Nq, Nk = sh["B"], sh["H"], sh["Nq"], sh["Nk"]
    q, k, v = qkv(B, H, Nq, Nk, sh["D"], sh["Dv"], seed=seed, grad=True)
    mask, allowed, _ = make_mask(kind, B, Nq, Nk, seed)
    allowed = allowed_pairs(allowed, Nq, Nk, causal).expand(B, H, Nq, Nk)
    m = hard(estimator="gumbel" if mode == "eval" else mode, chunk_size=chunk)
    m.train(mode != "eval")
    torch.manual_seed(seed)
    out, w = m(q, k, v, attn_mask=mask, is_causal=causal, need_weights=True)
    hit = selected(out, v)
    live = allowed.any(-1)
    assert hit.sum(-1)[live].eq(1).all()          # one value vector (v rows are distinct)
    assert not (hit & ~allowed)[live].any()       # never a masked or future key
    assert (out[~live] == 0).all() and (w[~live] == 0).all()
    assert torch.equal(w.detach() != 0, hit & live.unsqueeze(-1))  # one-hot weights
    assert (w.detach()[live].sum(-1) == 1).all()
    m.clear_samples()


def test_hard_eval_is_the_argmax_and_deterministic():
    q, k, v = qkv(2, 3, 9, 7, 4, 5, seed=3)
    mask = torch.rand(9, 7, generator=torch.Generator().manual_seed(2)) < 0.6
    m = hard(chunk_size=4).eval()
    state = torch.get_rng_state()
    out = m(q, k, v, attn_mask=mask, is_causal=True, scale=0.7)
    assert torch.equal(torch.get_rng_state(), state)  # no draw in eval mode
    assert torch.equal(out, m(q, k, v, attn_mask=mask, is_causal=True, scale=0.7))
    want = torch.zeros_like(out)
    for b in range(2):
        for h in range(3):
            for i in range(9):
                keys = [j for j in range(7) if mask[i, j] and j <= i]
                if keys:
                    best = max(keys, key=lambda j: float(q[b, h, i] @ k[b, h, j]))
                    want[b, h, i] = v[b, h, best]
    assert torch.equal(out, want)


def test_gumbel_draws_follow_the_softmax():
    """Frequencies of the drawn keys over many independent rows match softmax(scores)."""
    M = 20000
    q, k, v = qkv(1, 1, 2, 4, 3, 4, seed=6)
    mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    m = hard().train()
    torch.manual_seed(0)
    with torch.no_grad():
        _, w = m(q.expand(M, 1, 2, 3), k.expand(M, 1, 4, 3), v.expand(M, 1, 4, 4),
                 attn_mask=mask, need_weights=True)
    alpha = torch.softmax((q @ k.mT / math.sqrt(3)).masked_fill(~mask, -math.inf), -1)[0, 0]
    freq = w.mean(0)[0]
    assert (freq[~mask] == 0).all()
    assert ((freq - alpha).abs() <= 4 * (alpha * (1 - alpha) / M).sqrt() + 1e-12).all()


def test_gumbel_straight_through_gradient_is_the_soft_samples():
    q, k, v = qkv(2, 2, 5, 6, 3, 4, seed=8, grad=True)
    tau = 0.5
    m = hard(estimator="gumbel", tau=tau, seed=4, chunk_size=16).train()
    out = m(q, k, v, is_causal=True)
    g = rand(*out.shape, seed=1)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0
    # By hand, with the same Gumbel noise (one chunk, the generator seeded with seed=4).
    gen = torch.Generator().manual_seed(4)
    s = (q @ k.mT) / math.sqrt(3)
    s = s.masked_fill(~torch.ones(5, 6, dtype=torch.bool).tril(), -math.inf)
    gumbel = -torch.log(torch.empty_like(s).exponential_(generator=gen))
    y = torch.softmax((s + gumbel) / tau, -1)
    onehot = F.one_hot((s + gumbel).argmax(-1), 6).to(DT)
    st_out = (onehot - y.detach() + y) @ v
    torch.testing.assert_close(out, onehot @ v, rtol=0, atol=0)
    want = torch.autograd.grad((st_out * g).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


def test_reinforce_surrogate_reaches_q_and_k_and_updates_the_baseline():
    q, k, v = qkv(3, 2, 4, 5, 3, 2, seed=9, grad=True)
    m = hard(estimator="reinforce", baseline_decay=0.9).train()
    torch.manual_seed(1)
    out, w = m(q, k, v, need_weights=True)
    assert out.grad_fn is not None and m.has_samples
    assert torch.autograd.grad(out.sum(), (q, k), allow_unused=True) == (None, None)
    reward = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    loss = m.reinforce_loss(reward)
    alpha = torch.softmax(q @ k.mT / math.sqrt(3), -1)
    log_p = (alpha.log() * w).sum((-1, -2, -3))                # sum over heads and queries
    torch.testing.assert_close(loss, -(reward * log_p).mean(), **TIGHT)  # b_0 = 0
    gq, gk = torch.autograd.grad(loss, (q, k))
    assert gq.abs().sum() > 0 and gk.abs().sum() > 0
    assert m.baseline.item() == pytest.approx(0.1 * reward.mean().item())
    assert not m.has_samples
    # The next loss uses the baseline of the calls before it, then moves it again.
    b1 = m.baseline.item()
    _, w = m(q, k, v, need_weights=True)
    log_p = (alpha.log() * w).sum((-1, -2, -3))
    torch.testing.assert_close(m.reinforce_loss(reward), -((reward - b1) * log_p).mean(),
                               **TIGHT)
    assert m.baseline.item() == pytest.approx(0.9 * b1 + 0.1 * reward.mean().item())


def test_reinforce_entropy_bonus():
    q, k, v = qkv(2, 1, 3, 4, 2, 2, seed=10, grad=True)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True],
                         [False] * 4])  # one fully masked row: no entropy, no NaN
    reward = torch.tensor([0.3, -0.4], dtype=DT)
    losses = []
    for lam in (0.0, 0.5):
        m = hard(estimator="reinforce", entropy_weight=lam, seed=2).train()
        m(q, k, v, attn_mask=mask)
        losses.append(m.reinforce_loss(reward))
    alpha = torch.softmax((q @ k.mT / math.sqrt(2)).masked_fill(~mask, -math.inf), -1)
    alpha = alpha.nan_to_num(0.0)
    ent = -(alpha * alpha.clamp_min(1e-300).log()).sum((-1, -2, -3))
    torch.testing.assert_close(losses[1] - losses[0], -0.5 * ent.mean(), **TIGHT)
    grads = torch.autograd.grad(losses[1], (q, k))
    assert all(torch.isfinite(g).all() for g in grads)


def test_reinforce_gradient_is_unbiased():
    """The mean REINFORCE estimate of d E[r] / d(q, k) over many draws equals the exact
    gradient of E[r] = sum_i sum_j alpha_ij c_i . v_j, within 4 standard errors; the
    baseline moves between batches (any baseline that ignores the draw keeps it unbiased)."""
    q0 = rand(1, 1, 2, 2, seed=12, grad=True)
    k0 = rand(1, 1, 3, 2, seed=13, grad=True)
    v, c = rand(1, 1, 3, 2, seed=14), rand(2, 2, seed=15)
    alpha = torch.softmax(q0 @ k0.mT / math.sqrt(2), -1)[0, 0]
    exact = torch.autograd.grad((alpha * (c @ v[0, 0].T)).sum(), (q0, k0))
    exact = torch.cat([t.flatten() for t in exact])
    M, K = 4000, 12
    m = hard(estimator="reinforce").train().double()
    torch.manual_seed(0)
    estimates = []
    for _ in range(K):
        out = m(q0.expand(M, 1, 2, 2), k0.expand(M, 1, 3, 2), v.expand(M, 1, 3, 2))
        reward = (out[:, 0] * c).sum((-1, -2))
        grads = torch.autograd.grad(m.reinforce_loss(reward), (q0, k0))
        estimates.append(-torch.cat([t.flatten() for t in grads]))  # the loss is -E[r]'s
    est = torch.stack(estimates)
    se = est.std(0) / math.sqrt(K)
    assert m.baseline.item() != 0
    assert (4 * se < 0.3 * exact.abs().max()).all()  # the check has power
    assert ((est.mean(0) - exact).abs() <= 4 * se).all(), (est.mean(0), exact, se)


def test_total_reinforce_loss_over_a_model():
    torch.manual_seed(0)
    layer = MultiheadAttention(8, 2, "hard", estimator="reinforce").double().train()
    x = rand(3, 5, 8, seed=1)
    assert total_reinforce_loss(layer, torch.zeros(3, dtype=DT)) is None
    y = layer(x, is_causal=True)
    task = y.square().mean((1, 2))
    loss = task.mean() + total_reinforce_loss(layer, -task.detach())
    loss.backward()
    assert layer.q_proj.weight.grad.abs().sum() > 0 and layer.k_proj.weight.grad.abs().sum() > 0
    assert not layer.attn.has_samples and "attn.baseline" in layer.state_dict()


def test_hard_records_only_training_calls_with_autograd():
    q, k, v = qkv(1, 1, 3, 3, 2, 2)
    m = hard(estimator="reinforce")
    m.eval()(q, k, v)
    with torch.no_grad():
        m.train()(q, k, v)
    assert not m.has_samples
    m.train()(q, k, v)
    assert m.has_samples
    m.clear_samples()
    assert not m.has_samples


def test_hard_randomness_is_torchs_or_the_seeds():
    q, k, v = qkv(2, 2, 8, 8, 3, 3, seed=3)
    m = hard().train()
    runs = []
    for s in (5, 5, 6):
        torch.manual_seed(s)
        runs.append(m(q, k, v))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    fixed = hard(seed=1).train()
    a = fixed(q, k, v)
    torch.manual_seed(123)
    assert torch.equal(a, fixed(q, k, v))


def test_hard_bad_hyperparameters_and_calls():
    with pytest.raises(ValueError, match=r"'estimator' must be one of \['gumbel', 'reinforce'\]; "
                                         r"got 'gumbell'; did you mean 'gumbel'"):
        hard(estimator="gumbell")
    for name, value, exc, pattern in [
            ("tau", 0.0, ValueError, r"'tau' must be > 0.0; got 0.0"),
            ("tau", -1.0, ValueError, r"'tau' must be > 0.0"),
            ("baseline_decay", 1.5, ValueError, r"'baseline_decay' must be >= 0.0 and <= 1.0"),
            ("entropy_weight", -0.1, ValueError, r"'entropy_weight' must be >= 0.0"),
            ("seed", -1, ValueError, r"'seed' must be >= 0"),
            ("seed", True, TypeError, r"'seed' must be an int; got bool"),
            ("chunk_size", 0, ValueError, r"'chunk_size' must be >= 1")]:
        with pytest.raises(exc, match=pattern):
            hard(**{name: value})
    q, k, v = qkv(2, 1, 3, 3, 2, 2)
    with pytest.raises(ValueError, match=r"reinforce_loss needs estimator='reinforce'"):
        hard().reinforce_loss(torch.zeros(2))
    m = hard(estimator="reinforce").train()
    with pytest.raises(RuntimeError, match=r"no recorded sample.*training mode"):
        m.reinforce_loss(torch.zeros(2))
    m(q, k, v)
    with pytest.raises(ValueError, match=r"reward must be a floating tensor of shape \(2,\).*"
                                         r"got torch.float32 shape \(3,\)"):
        m.reinforce_loss(torch.zeros(3))
    with pytest.raises(TypeError, match=r"reward must be a torch.Tensor of shape \(2,\); got list"):
        m.reinforce_loss([0.0, 1.0])
    assert m.has_samples  # a refused call keeps them
