"""Co-attention (Lu et al. 2016): the two pair mechanisms against the paper's equations
written here independently (column form, one example at a time, real positions sliced out
instead of masked), their defining property, padding, gradients and bad input."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

import attnlab
import attnlab.mechanisms.co_attention  # noqa: F401
from attnlab.mechanisms.co_attention import (
    ParallelCoAttention,
    alternating_reference,
    parallel_reference,
)
from attnlab.verify import verify

NAMES = ("co_attention_parallel", "co_attention_alternating")
QUADRATIC = re.compile(r"N\s*\^\s*2|N²")


def make(name, d=4, k=None, seed=0):
    torch.manual_seed(seed)
    return attnlab.create(name, head_dim=d, hidden_dim=k).double()


def params(mech) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in mech.named_parameters()}


# ---------------------------------------------------------------- the paper, plainly
# Column form as in the paper: Q is d x T, V is d x N, W_v V is k x N; one example, real
# positions only (no masks); softmax by explicit exp / sum.
def pool(scores, X):
    """(sum_i softmax(scores)_i x_i, weights) for the columns x_i of X (d x n)."""
    if scores.numel() == 0:
        return torch.zeros(X.shape[0], dtype=X.dtype), scores
    e = torch.exp(scores - scores.max())
    p = e / e.sum()
    return X @ p, p


def parallel_plain(Q, V, P):
    C = torch.tanh(Q.T @ P["W_b"] @ V)                              # T x N
    H_v = torch.tanh(P["W_v"] @ V + (P["W_q"] @ Q) @ C)            # k x N
    H_q = torch.tanh(P["W_q"] @ Q + (P["W_v"] @ V) @ C.T)          # k x T
    (v_hat, a_v), (q_hat, a_q) = pool(P["w_hv"] @ H_v, V), pool(P["w_hq"] @ H_q, Q)
    return q_hat, v_hat, a_q, a_v


def attend(X, g, W_x, W_g, w_hx):
    """A(X; g) of eq. 6; g = None is the zero guidance."""
    H = W_x @ X
    if g is not None:
        H = H + (W_g @ g)[:, None] * torch.ones(1, X.shape[1], dtype=X.dtype)  # (W_g g) 1^T
    return pool(w_hx @ torch.tanh(H), X)


def alternating_plain(Q, V, P):
    s, _ = attend(Q, None, P["W_x1"], None, P["w_hx1"])
    v_hat, a_v = attend(V, s, P["W_x2"], P["W_g2"], P["w_hx2"])
    q_hat, a_q = attend(Q, v_hat, P["W_x3"], P["W_g3"], P["w_hx3"])
    return q_hat, v_hat, a_q, a_v


PLAIN = {"co_attention_parallel": parallel_plain, "co_attention_alternating": alternating_plain}
REFERENCE = {"co_attention_parallel": parallel_reference,
             "co_attention_alternating": alternating_reference}


def plain_batch(name, mech, a, b, a_mask, b_mask):
    """The plain formulas example by example on the real positions; weights scattered back
    into (B, N) rows with zeros at the padded positions."""
    P = params(mech)
    out = [[], [], torch.zeros(a.shape[:2], dtype=a.dtype), torch.zeros(b.shape[:2],
                                                                          dtype=b.dtype)]
    for i in range(a.shape[0]):
        ra = torch.ones(a.shape[1], dtype=torch.bool) if a_mask is None else a_mask[i]
        rb = torch.ones(b.shape[1], dtype=torch.bool) if b_mask is None else b_mask[i]
        q_hat, v_hat, a_q, a_v = PLAIN[name](a[i, ra].T, b[i, rb].T, P)
        out[0].append(q_hat)
        out[1].append(v_hat)
        out[2][i, ra], out[3][i, rb] = a_q, a_v
    return torch.stack(out[0]), torch.stack(out[1]), out[2], out[3]


# ---------------------------------------------------------------- registry and gate
@pytest.mark.parametrize("name", NAMES)
def test_registered_as_pair_mechanisms_with_honest_metadata(name):
    s = attnlab.get(name)
    assert s.inputs == "pair" and s.family == "co_attention" and s.learnable and s.exact
    assert s.cross and s.key_padding and not s.causal and not s.arbitrary_mask
    assert s.paper.year == 2016 and "1606.00061" in s.paper.url
    assert re.match(r"O\(", s.time) and re.match(r"O\(", s.memory) and s.equation
    assert name not in attnlab.list_mechanisms()  # the (q, k, v) list stays as it was
    assert name in attnlab.list_mechanisms(inputs="pair")
    assert name in attnlab.list_mechanisms(inputs=None)
    mech = attnlab.create_for(name, head_dim=8, num_heads=2, max_seq_len=32)
    assert isinstance(mech, attnlab.Mechanism) and type(mech).spec is s
    assert s.to_dict()["inputs"] == "pair"
    # The affinity matrix is quadratic; alternating co-attention never pairs positions.
    assert bool(QUADRATIC.search(s.memory)) == (name == "co_attention_parallel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_the_gate_passes(name, dtype):
    r = verify(name, n=12, head_dim=6, batch=3, dtype=dtype)
    assert r.ok, r
    assert verify(name, n=5, head_dim=3, batch=2, hidden_dim=7).ok


def test_the_gate_fails_a_wrong_module(monkeypatch):
    """Dropping the affinity (C = 0: two self-attentions) must fail the gate."""
    def no_affinity(self, Q, V, a_mask, b_mask, p):
        return ParallelCoAttention._co_attend(self, Q, V, a_mask, b_mask,
                                              {**p, "W_b": p["W_b"] * 0})
    monkeypatch.setattr(ParallelCoAttention, "_co_attend", no_affinity)
    r = verify("co_attention_parallel", n=12, head_dim=6)
    assert not r.ok and r.error > 1e-3, r


# ---------------------------------------------------------------- against the formulas
@st.composite
def pair_inputs(draw):
    B, na, nb = draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 9))
    d, k = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    a = torch.randn(B, na, d, generator=g, dtype=torch.float64)
    b = torch.randn(B, nb, d, generator=g, dtype=torch.float64)
    masks = [torch.rand(B, n, generator=g) < 0.7 if draw(st.booleans()) else None
             for n in (na, nb)]
    return d, k, a, b, *masks


@pytest.mark.parametrize("name", NAMES)
@given(case=pair_inputs())
def test_equals_the_equations_written_plainly(name, case):
    d, k, a, b, a_mask, b_mask = case
    mech = make(name, d, k)
    (a_hat, b_hat), (w_a, w_b) = mech(a, b, a_mask=a_mask, b_mask=b_mask, need_weights=True)
    q_hat, v_hat, a_q, a_v = plain_batch(name, mech, a, b, a_mask, b_mask)
    for got, want in ((a_hat, q_hat), (b_hat, v_hat), (w_a, a_q), (w_b, a_v)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # The module's float64 reference (the gate's) is the same formula.
    ref = REFERENCE[name](a, b, a_mask, b_mask, mech=mech)
    torch.testing.assert_close(torch.cat(ref, -1), torch.cat([q_hat, v_hat], -1),
                               rtol=1e-10, atol=1e-12)
    if a_mask is not None:  # padded positions: weight exactly 0
        assert bool((w_a[~a_mask] == 0).all())


# ---------------------------------------------------------------- the defining property
def self_pool(X, W, w, C=None):
    """Self-attentive pooling of one sequence (rows of X): h_i = tanh(W x_i + sum_t C_ti
    W x_t), a = softmax(w^T h), sum_i a_i x_i; C = None: no affinity, h_i = tanh(W x_i)
    (Lin et al. 2017, one hop)."""
    WX = X @ W.T
    H = torch.tanh(WX if C is None else WX + C.transpose(-1, -2) @ WX)
    p = torch.softmax(H @ w, dim=-1)
    return (p.unsqueeze(-2) @ X).squeeze(-2)


def test_without_the_affinity_parallel_is_two_self_attentions():
    mech = make("co_attention_parallel", d=5, k=3)
    with torch.no_grad():
        mech.W_b.zero_()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 4, 5, generator=g, dtype=torch.float64), \
        torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    a_hat, b_hat = mech(a, b)
    P = params(mech)
    torch.testing.assert_close(a_hat, self_pool(a, P["W_q"], P["w_hq"]))
    torch.testing.assert_close(b_hat, self_pool(b, P["W_v"], P["w_hv"]))


def test_without_guidance_alternating_is_two_self_attentions():
    mech = make("co_attention_alternating", d=5, k=3)
    with torch.no_grad():
        mech.W_g2.zero_()
        mech.W_g3.zero_()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 4, 5, generator=g, dtype=torch.float64), \
        torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    a_hat, b_hat = mech(a, b)
    P = params(mech)
    torch.testing.assert_close(a_hat, self_pool(a, P["W_x3"], P["w_hx3"]))
    torch.testing.assert_close(b_hat, self_pool(b, P["W_x2"], P["w_hx2"]))


def symmetric_parallel(d=4, k=3, symmetric=True):
    mech = make("co_attention_parallel", d, k, seed=3)
    with torch.no_grad():
        if symmetric:
            mech.W_b.copy_((mech.W_b + mech.W_b.T) / 2)
        mech.W_v.copy_(mech.W_q)
        mech.w_hv.copy_(mech.w_hq)
    return mech


def test_identical_inputs_give_two_equal_self_attentions():
    """a = b = X, symmetric W_b and tied W_q = W_v, w_hq = w_hv: C = tanh(X W_b X^T) is
    symmetric, so H^q = H^v, both summaries are one self-attention pooling of X in which
    each position sums its sequence through C; the weights coincide."""
    mech = symmetric_parallel()
    X = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (a_hat, b_hat), (w_a, w_b) = mech(X, X, need_weights=True)
    P = params(mech)
    C = torch.tanh(X @ P["W_b"] @ X.transpose(1, 2))
    want = self_pool(X, P["W_q"], P["w_hq"], C)
    torch.testing.assert_close(a_hat, want)
    torch.testing.assert_close(b_hat, want)
    torch.testing.assert_close(w_a, w_b)
    # Control: with an asymmetric W_b the same inputs give two different summaries.
    a_hat, b_hat = symmetric_parallel(symmetric=False)(X, X)
    assert (a_hat - b_hat).abs().max() > 1e-4


def test_identical_inputs_alternating_tied_steps_without_guidance():
    mech = make("co_attention_alternating", d=4, k=3, seed=5)
    with torch.no_grad():
        mech.W_g2.zero_()
        mech.W_g3.zero_()
        mech.W_x3.copy_(mech.W_x2)
        mech.w_hx3.copy_(mech.w_hx2)
    X = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    a_hat, b_hat = mech(X, X)
    torch.testing.assert_close(a_hat, b_hat, rtol=0, atol=0)
    torch.testing.assert_close(a_hat, self_pool(X, mech.W_x2.detach(), mech.w_hx2.detach()))
    with torch.no_grad():  # control: the guidance makes the two steps differ
        mech.W_g2.normal_()
    a_hat, b_hat = mech(X, X)
    assert (a_hat - b_hat).abs().max() > 1e-4


# ---------------------------------------------------------------- padding, lengths, order
@pytest.mark.parametrize("name", NAMES)
def test_padding_with_masked_positions_changes_nothing(name):
    mech = make(name, d=4)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), \
        torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    (ref_a, ref_b), (ref_wa, ref_wb) = mech(a, b, need_weights=True)
    # Pads anywhere (front and back), holding NaN and huge values: none may leak.
    pa = torch.cat([torch.full((2, 2, 4), float("nan")), a, torch.full((2, 1, 4), 1e30)], 1)
    pb = torch.cat([b, torch.full((2, 4, 4), float("nan"), dtype=torch.float64)], 1)
    pa, pb = pa.double().requires_grad_(), pb.requires_grad_()
    ma = torch.tensor([False, False, True, True, True, False]).expand(2, 6)
    mb = torch.arange(9).expand(2, 9) < 5
    (out_a, out_b), (wa, wb) = mech(pa, pb, a_mask=ma, b_mask=mb, need_weights=True)
    torch.testing.assert_close(out_a, ref_a, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out_b, ref_b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(wa[:, 2:5], ref_wa)
    torch.testing.assert_close(wb[:, :5], ref_wb)
    assert bool((wa[~ma] == 0).all() and (wb[~mb] == 0).all())
    (out_a.sum() + out_b.sum()).backward()
    assert torch.isfinite(pa.grad).all() and bool((pa.grad[~ma] == 0).all())
    assert bool((pb.grad[~mb] == 0).all()) and pb.grad[mb].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_different_lengths_and_empty_sides(name):
    mech = make(name, d=4)
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(3, 2, 4, generator=g, dtype=torch.float64), \
        torch.randn(3, 11, 4, generator=g, dtype=torch.float64)
    b_mask = torch.ones(3, 11, dtype=torch.bool)
    b_mask[1] = False  # row 1: nothing real in b
    (a_hat, b_hat), (w_a, w_b) = mech(a, b, b_mask=b_mask, need_weights=True)
    assert a_hat.shape == b_hat.shape == (3, 4) and w_a.shape == (3, 2) and w_b.shape == (3, 11)
    torch.testing.assert_close(w_a.sum(-1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(w_b.sum(-1), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    assert bool((b_hat[1] == 0).all() and (w_b[1] == 0).all())
    a_empty, b_alone = mech(a[:, :0], b)  # Na = 0: q^ = 0, v^ the plain formula's
    assert bool((a_empty == 0).all())
    torch.testing.assert_close(b_alone, plain_batch(name, mech, a[:, :0], b, None, None)[1])


@pytest.mark.parametrize("name", NAMES)
def test_positions_are_a_set(name):
    """No positions in the equations: permuting either sequence permutes its weights and
    leaves both summaries unchanged."""
    mech = make(name, d=4)
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(2, 5, 4, generator=g, dtype=torch.float64), \
        torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    pa, pb = torch.randperm(5, generator=g), torch.randperm(7, generator=g)
    (a_hat, b_hat), (w_a, w_b) = mech(a, b, need_weights=True)
    (a2, b2), (w_a2, w_b2) = mech(a[:, pa], b[:, pb], need_weights=True)
    torch.testing.assert_close(a2, a_hat)
    torch.testing.assert_close(b2, b_hat)
    torch.testing.assert_close(w_a2, w_a[:, pa])
    torch.testing.assert_close(w_b2, w_b[:, pb])


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_computes_in_float32_and_returns_the_input_dtype(name):
    mech = make(name, d=8).float()
    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(2, 5, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    a_hat, b_hat = mech(a.half(), b.half())
    assert a_hat.dtype == b_hat.dtype == torch.float16
    ref = torch.cat(REFERENCE[name](a.half(), b.half(), mech=mech), -1)
    assert (torch.cat([a_hat, b_hat], -1).double() - ref).abs().max() < 2e-2 * ref.abs().max()


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_inputs_and_parameters(name):
    mech = make(name, d=3, k=2)
    g = torch.Generator().manual_seed(11)
    a = torch.randn(2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    masks = {"a_mask": torch.tensor([[True, True, False], [True, True, True]]),
             "b_mask": torch.tensor([[True, False, True, True], [True, True, True, False]])}
    names = [n for n, _ in mech.named_parameters()]
    ps = [p.detach().clone().requires_grad_() for _, p in mech.named_parameters()]

    def f(a, b, *ps):
        return functional_call(mech, dict(zip(names, ps, strict=True)), (a, b), masks)

    assert torch.autograd.gradcheck(f, (a, b, *ps))


# ---------------------------------------------------------------- bad input
X = torch.randn(2, 5, 4)
Y = torch.randn(2, 6, 4)
BAD = [
    (dict(a=[1.0]), TypeError, r"co_attention_\w+: a must be a torch.Tensor \(B, Na, D\); got list"),
    (dict(a=X.long()), TypeError, r"a must be a floating-point tensor; got torch.int64"),
    (dict(a=X[0]), ValueError, r"a must be 3-D \(B, Na, D\) with D=4; got 2-D shape \(5, 4\)"),
    (dict(b=Y[..., :3]), ValueError, r"b feature size 3 does not match head_dim=4"),
    (dict(b=Y[:1]), ValueError, r"a and b batch sizes differ: a \(2, 5, 4\), b \(1, 6, 4\)"),
    (dict(b=Y.double()), TypeError, r"b must have a's dtype and device \(torch.float32"),
    (dict(a_mask=torch.ones(2, 5)), TypeError, r"a_mask must be a bool tensor \(B, Na\) = \(2, 5\) \(True = real"),
    (dict(b_mask=torch.ones(6, dtype=torch.bool)), ValueError, r"b_mask must have shape \(B, Nb\) = \(2, 6\).*nothing is broadcast\); got \(6\)"),
    (dict(a_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, r"a_mask must have shape \(B, Na\) = \(2, 5\)"),
    (dict(need_weights="yes"), TypeError, r"need_weights must be a bool"),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kw, exc, msg", BAD, ids=[m[:30] for _, _, m in BAD])
def test_bad_input_is_named(name, kw, exc, msg):
    mech = attnlab.create(name, head_dim=4)
    call = {"a": X, "b": Y, **kw}
    with pytest.raises(exc, match=msg):
        mech(call.pop("a"), call.pop("b"), **call)


@pytest.mark.parametrize("name", NAMES)
def test_bad_hyperparameters_are_named(name):
    with pytest.raises(ValueError, match=r"hyperparameter 'head_dim' is required"):
        attnlab.create(name)
    with pytest.raises(ValueError, match=r"'hidden_dim' must be >= 1; got 0"):
        attnlab.create(name, head_dim=4, hidden_dim=0)
    with pytest.raises(TypeError, match=r"'hidden_dim' must be an int; got bool"):
        attnlab.create(name, head_dim=4, hidden_dim=True)
    with pytest.raises(TypeError, match=r"unknown hyperparameter 'hiden_dim'.*hidden_dim"):
        attnlab.create(name, head_dim=4, hiden_dim=3)
