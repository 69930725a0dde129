"""DeltaNet (the delta rule): its chunkwise (WY/UT) form against the paper's recurrence.

The reference here is the recurrence of Yang et al. 2024 written literally, in the paper's
layout (``S`` is ``Dv x D``, ``S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T``,
``o_t = S_t q_t``), one (batch, head, position) at a time in float64; it shares no code
with the mechanism (which keeps ``S^T`` and solves chunks). Then: the dense closed form of
the correctness gate, the delta rule's defining property (a ``beta = 1`` write of ``(k, v)``
read back with ``q = k`` gives ``v``, overwriting what ``k`` held), the non-causal
``A + A_rev - diag(A)``, causality, decoding with the state, fla's reference, memory and
errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import LargestTensor, assert_causal, saved_numels
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
import attnlab.mechanisms.delta  # noqa: F401  (registers deltanet until __init__ does)
from attnlab.bench.fla_reference import available, load
from attnlab.mechanisms.delta import (
    chunk_delta_rule,
    delta_matrix,
    delta_reference,
    recurrent_delta_rule,
)
from attnlab.nn.cache import state_nbytes

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


def make(H=2, D=4, chunk_size=4, seed=0, dtype=F64):
    torch.manual_seed(seed)
    m = attnlab.create_for("deltanet", head_dim=D, num_heads=H, chunk_size=chunk_size)
    with torch.no_grad():  # a non-zero bias: beta away from 1/2
        m.b_beta.normal_()
    return m.to(dtype)


def qkv(B=2, H=2, N=16, D=4, Dv=4, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, d, generator=g, dtype=F64).to(dtype)
                 for d in (D, D, Dv))


# ---------------------------------------------------------------- the paper's recurrence
def paper_recurrence(q, k, v, w, b, scale):
    """o_t = S_t q_t, S_t = S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T, literally."""
    B, H, N, D = q.shape
    eye = torch.eye(D, dtype=F64)
    rows = []
    for bi in range(B):
        for h in range(H):
            S = torch.zeros(v.shape[-1], D, dtype=F64)
            for t in range(N):
                k_raw = k[bi, h, t]
                beta = torch.sigmoid(w[h] @ k_raw + b[h])
                k_t = k_raw / k_raw.norm()
                q_t = scale * q[bi, h, t] / q[bi, h, t].norm()
                S = S @ (eye - beta * torch.outer(k_t, k_t)) + beta * torch.outer(v[bi, h, t], k_t)
                rows.append(S @ q_t)
    return torch.stack(rows).reshape(B, H, N, -1)


def paper_bidirectional(q, k, v, w, b, scale):
    """Both directions' recurrences summed, the diagonal beta_t (q_t . k_t) v_t once."""
    fwd = paper_recurrence(q, k, v, w, b, scale)
    rev = paper_recurrence(q.flip(2), k.flip(2), v.flip(2), w, b, scale).flip(2)
    beta = torch.sigmoid(torch.einsum("bhnd,hd->bhn", k, w) + b[:, None])
    qk = (F.normalize(q, dim=-1) * F.normalize(k, dim=-1)).sum(-1) * scale
    return fwd + rev - (beta * qk).unsqueeze(-1) * v


def grads(out, *tensors):
    return torch.autograd.grad(out.pow(2).sum(), tensors)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 23), D=st.integers(1, 5),
       Dv=st.integers(1, 5), C=st.integers(1, 9), causal=st.booleans(), seed=st.integers(0, 99))
def test_chunkwise_equals_the_recurrence_outputs_and_gradients(B, H, N, D, Dv, C, causal, seed):
    m = make(H, D, C, seed)
    q, k, v = (t.requires_grad_() for t in qkv(B, H, N, D, Dv, seed))
    scale = D ** -0.5
    out = m(q, k, v, is_causal=causal)
    ref_fn = paper_recurrence if causal else paper_bidirectional
    ref = ref_fn(q, k, v, m.w_beta, m.b_beta, scale)
    torch.testing.assert_close(out, ref, **TIGHT)
    params = (q, k, v, m.w_beta, m.b_beta)
    for got, want in zip(grads(out, *params), grads(ref, *params), strict=True):
        torch.testing.assert_close(got, want, **TIGHT)
    # the gate's dense closed form (I + tril(diag(beta) K K^T, -1))^-1 is the same map
    dense = delta_reference(q.detach(), k.detach(), v.detach(), mech=m, scale=None,
                            is_causal=causal)
    torch.testing.assert_close(dense, ref.detach(), **TIGHT)


@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 30), C=st.integers(1, 12), seed=st.integers(0, 99))
def test_chunk_form_and_recurrent_form_agree_from_any_state(N, C, seed):
    q, k, v = qkv(1, 2, N, 3, 2, seed)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    beta = torch.rand(1, 2, N, generator=torch.Generator().manual_seed(seed), dtype=F64)
    S0 = torch.randn(1, 2, 3, 2, dtype=F64)
    o1, S1 = chunk_delta_rule(q, k, v, beta, C, S0)
    o2, S2 = recurrent_delta_rule(q, k, v, beta, S0)
    torch.testing.assert_close(o1, o2, **TIGHT)
    torch.testing.assert_close(S1, S2, **TIGHT)


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64_inputs_and_beta_parameters(causal):
    m = make(H=1, D=3, chunk_size=3)
    q, k, v = (t.requires_grad_() for t in qkv(1, 1, 7, 3, 2))
    w, b = (p.detach().clone().requires_grad_() for p in (m.w_beta, m.b_beta))

    def f(q, k, v, w, b):
        return torch.func.functional_call(m, {"w_beta": w, "b_beta": b}, (q, k, v),
                                          {"is_causal": causal})

    assert torch.autograd.gradcheck(f, (q, k, v, w, b), fast_mode=True)


# ---------------------------------------------------------------- the defining property
def overwrite_inputs(N=12, D=4, seed=0):
    """Keys drawn from 3 directions (each written several times), q = k, values random."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(3, D, generator=g, dtype=F64) * 3.0
    k = dirs[torch.randint(0, 3, (N,), generator=g)].reshape(1, 1, N, D)
    return k.clone(), k, torch.randn(1, 1, N, 2, generator=g, dtype=F64)


def test_a_beta_one_write_is_read_back_exactly_and_overwrites():
    q, k, v = overwrite_inputs()
    m = make(H=1, D=4)
    with torch.no_grad():  # beta_t = sigmoid(40) == 1.0 in float64
        m.w_beta.zero_()
        m.b_beta.fill_(40.0)
    # S_t k_t = S_{t-1}(k_t - k_t) + v_t = v_t: each key repeated, its old value erased
    torch.testing.assert_close(m(q, k, v, is_causal=True, scale=1.0), v, rtol=0, atol=1e-12)
    # linear attention's additive write (S += v k^T) would return the sum instead
    kn = F.normalize(k, dim=-1)
    additive = torch.tril(kn @ kn.transpose(-1, -2)) @ v
    assert (additive - v).abs().max() > 0.5


def test_a_partial_write_interpolates_old_and_new_value():
    """S_t k_t = (1 - beta_t) S_{t-1} k_t + beta_t v_t (k_t normalised)."""
    q, k, v = overwrite_inputs(seed=3)
    m = make(H=1, D=4)
    full = m(q, k, v, is_causal=True, scale=1.0)
    beta = torch.sigmoid(k[0, 0] @ m.w_beta[0] + m.b_beta[0]).detach()
    kn = F.normalize(k, dim=-1)
    for t in range(1, k.shape[2]):
        _, state = m.decode(q[:, :, :t], k[:, :, :t], v[:, :, :t], scale=1.0)
        old = kn[0, 0, t] @ state["S"][0, 0]                         # S_{t-1} k_t
        want = (1 - beta[t]) * old + beta[t] * v[0, 0, t]
        torch.testing.assert_close(full[0, 0, t].detach(), want.detach(), **TIGHT)


def test_orthonormal_keys_store_independent_slots():
    """With orthonormal keys and beta = 1 the final state holds, under each key, the last
    value written with it (a key-value memory), and nothing of the others'."""
    basis = torch.linalg.qr(torch.randn(4, 4, dtype=F64))[0].T       # rows orthonormal
    order = torch.tensor([0, 1, 2, 0, 3, 1, 0])
    k = basis[order].reshape(1, 1, 7, 4)
    v = torch.randn(1, 1, 7, 3, dtype=F64)
    beta = torch.ones(1, 1, 7, dtype=F64)
    _, S = chunk_delta_rule(k, k, v, beta, 3)
    for slot in range(4):
        last = max(t for t in range(7) if order[t] == slot)
        torch.testing.assert_close(basis[slot] @ S[0, 0], v[0, 0, last], **TIGHT)


# ---------------------------------------------------------------- the non-causal form
def test_non_causal_map_is_a_plus_a_rev_minus_its_diagonal():
    N = 9
    m = make(H=1, D=4, chunk_size=4)
    q, k, _ = qkv(1, 1, N, 4, 4, seed=5)
    eye = torch.eye(N, dtype=F64).reshape(1, 1, N, N)                # o = A v, v = I: o = A
    A = m(q, k, eye, is_causal=True).detach()
    A_rev = m(q.flip(2), k.flip(2), eye, is_causal=True).detach().flip(-2, -1)
    A_nc = m(q, k, eye, is_causal=False).detach()
    assert torch.equal(A.triu(1), torch.zeros_like(A))               # causal: lower triangular
    torch.testing.assert_close(torch.diagonal(A, dim1=-2, dim2=-1),
                               torch.diagonal(A_rev, dim1=-2, dim2=-1), **TIGHT)
    diag = torch.diag_embed(torch.diagonal(A, dim1=-2, dim2=-1))
    torch.testing.assert_close(A_nc, A + A_rev - diag, **TIGHT)
    beta = torch.sigmoid(k[0, 0] @ m.w_beta[0] + m.b_beta[0]).detach()
    qk = (F.normalize(q, dim=-1) * F.normalize(k, dim=-1)).sum(-1)[0, 0] * 0.5
    torch.testing.assert_close(torch.diagonal(A[0, 0]), beta * qk, **TIGHT)


# ---------------------------------------------------------------- key padding
@settings(max_examples=20, deadline=None)
@given(keep=st.lists(st.booleans(), min_size=1, max_size=14), causal=st.booleans(),
       C=st.integers(1, 6), seed=st.integers(0, 99))
def test_padded_positions_are_removed_exactly(keep, causal, C, seed):
    """Real rows equal the sequence without the padded positions; the padded content
    (any values, here large) changes nothing and gets zero gradient."""
    keep = torch.tensor(keep)
    keep[seed % len(keep)] = True
    N, real = len(keep), keep.nonzero().flatten()
    m = make(H=2, chunk_size=C, seed=seed)
    q, k, v = qkv(1, 2, N, 4, 3, seed)
    noisy = [torch.where(keep[:, None], x, 50 * torch.randn_like(x) + 7) for x in (q, k, v)]
    q, k, v = (x.requires_grad_() for x in noisy)
    out = m(q, k, v, attn_mask=keep.reshape(1, 1, 1, N), is_causal=causal)[:, :, real]
    alone = m(q[:, :, real], k[:, :, real], v[:, :, real], is_causal=causal)
    torch.testing.assert_close(out, alone, **TIGHT)
    gq, gk, gv = grads(out, q, k, v)
    assert all((g[:, :, ~keep] == 0).all() for g in (gq, gk, gv))


# ---------------------------------------------------------------- causality
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_future_tokens_do_not_change_the_past(chunk_size):
    assert_causal(make(chunk_size=chunk_size), *qkv(N=13), t=6)


# ---------------------------------------------------------------- decoding
def decode_in(m, q, k, v, sizes):
    outs, state, t = [], None, 0
    for s in sizes:
        o, new = m.decode(q[:, :, t:t + s], k[:, :, t:t + s], v[:, :, t:t + s], state)
        if state is not None:
            assert new["S"] is not state["S"]
        outs.append(o)
        state, t = new, t + s
    return torch.cat(outs, dim=2), state


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_decoding_in_any_chunks_equals_the_full_causal_forward(data):
    N = data.draw(st.integers(1, 30))
    sizes, left = [], N
    while left:
        sizes.append(data.draw(st.integers(1, left)))
        left -= sizes[-1]
    m = make(chunk_size=data.draw(st.integers(1, 8)))
    q, k, v = qkv(N=N, Dv=3, seed=data.draw(st.integers(0, 99)))
    out, state = decode_in(m, q, k, v, sizes)
    torch.testing.assert_close(out, m(q, k, v, is_causal=True), **TIGHT)
    assert state["t"] == N and state["S"].shape == (2, 2, 4, 3)


def test_token_by_token_state_is_constant_in_size_and_never_modified():
    m = make()
    q, k, v = qkv(N=40)
    state, sizes = None, set()
    for t in range(40):
        before = None if state is None else state["S"].clone()
        _, new = m.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        if state is not None:
            assert torch.equal(state["S"], before)                   # the old state untouched
        sizes.add(state_nbytes(new))
        state = new
    assert sizes == {2 * 2 * 4 * 4 * 8}
    torch.testing.assert_close(state["S"], decode_in(m, q, k, v, [40])[1]["S"], **TIGHT)


def test_a_long_prefill_is_chunkwise_without_an_n_by_n_tensor():
    N = 1024
    m = make(H=1, D=8, chunk_size=32, dtype=torch.float32)
    q, k, v = qkv(1, 1, N, 8, 8, dtype=torch.float32)
    with torch.no_grad(), LargestTensor() as probe:
        out, state = m.decode(q, k, v)
    assert probe.largest < N * N // 16
    torch.testing.assert_close(out, m(q, k, v, is_causal=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_the_state_in_float32(dtype):
    m = make(dtype=dtype)
    q, k, v = qkv(dtype=dtype)
    out, state = m.decode(q, k, v)
    assert out.dtype == dtype and state["S"].dtype == torch.float32
    out2, _ = m.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)
    assert out2.dtype == dtype
    ref = delta_reference(q.double(), k.double(), v.double(), mech=m, scale=None,
                          is_causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)
    assert torch.isfinite(m(q, k, v)).all()


# ---------------------------------------------------------------- fla's reference
@pytest.mark.skipif(not available(), reason="fla-core not installed")
def test_equals_fla_delta_rule_on_the_same_normalised_inputs_and_beta():
    fla = load("delta_rule")
    m = make(H=2, D=8, chunk_size=16)
    q, k, v = qkv(2, 2, 64, 8, 6, seed=2)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    beta = torch.sigmoid(torch.einsum("bhnd,hd->bhn", k, m.w_beta) + m.b_beta[:, None]).detach()
    out, state = m.decode(q, k, v)
    full = m(q, k, v, is_causal=True).detach()
    o_chunk, S_chunk = fla.delta_rule_chunkwise(qn, kn, v, beta, chunk_size=32)
    torch.testing.assert_close(full, o_chunk, **TIGHT)
    torch.testing.assert_close(state["S"], S_chunk, **TIGHT)        # same (D, Dv) layout
    # the recurrence computes in float32 (it casts its inputs); N = 37: no chunk multiple
    o_rec, S_rec = fla.delta_rule_recurrence(qn[:, :, :37], kn[:, :, :37], v[:, :, :37],
                                             beta[:, :, :37])
    torch.testing.assert_close(full[:, :, :37], o_rec.double(), rtol=1e-5, atol=1e-5)
    S_ours = m.decode(q[:, :, :37], k[:, :, :37], v[:, :, :37])[1]["S"]
    torch.testing.assert_close(S_ours, S_rec.double(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- memory and errors
def test_training_memory_is_sub_quadratic():
    N = 512
    m = make(H=1, D=8, chunk_size=16, dtype=torch.float32)
    q, k, v = (t.requires_grad_() for t in qkv(1, 1, N, 8, 8, dtype=torch.float32))
    for causal in (True, False):
        with saved_numels() as saved, LargestTensor() as probe:
            m(q, k, v, is_causal=causal).sum().backward()
        assert max(saved) < N * N // 16 and probe.largest < N * N // 16
        assert sum(saved) < 40 * N * 16


def test_flags_are_honest():
    s = attnlab.get("delta_rule")
    assert s.name == "deltanet" and s.family == "delta"
    assert (s.causal, s.decode_state, s.exact, s.learnable) == (True, True, False, True)
    assert s.key_padding and not (s.cross or s.arbitrary_mask or s.kv_cache or s.returns_weights)
    assert "N^2" not in s.memory and s.hparam("chunk_size").default == 64


@pytest.mark.parametrize("hp,exc,pattern", [
    ({"chunk_size": 0}, ValueError, r"'chunk_size' must be >= 1; got 0"),
    ({"chunk_size": 2.5}, TypeError, r"'chunk_size' must be an int; got float"),
    ({"chunk_size": True}, TypeError, r"'chunk_size' must be an int; got bool"),
    ({"chunk": 4}, TypeError, r"unknown hyperparameter 'chunk'.*chunk_size"),
])
def test_bad_hyperparameters_are_named(hp, exc, pattern):
    with pytest.raises(exc, match=pattern):
        attnlab.create_for("deltanet", head_dim=4, num_heads=2, **hp)


def test_required_sizes_and_call_time_errors_are_clear():
    with pytest.raises(ValueError, match="'num_heads' is required"):
        attnlab.create("deltanet", head_dim=4)
    m = make()
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"num_heads=2 .* does not match the H heads of q, 3"):
        m(*qkv(H=3))
    with pytest.raises(ValueError, match=r"head_dim=4 .* head dim D of q, 5"):
        m(*qkv(D=5))
    with pytest.raises(ValueError, match="dropout_p=0.1 is not supported"):
        m(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="cannot take an arbitrary attn_mask"):
        m(q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs Nq == Nk"):
        m(q[:, :, :5], k, v)
    with pytest.raises(ValueError, match="cannot return attention weights"):
        m(q, k, v, need_weights=True)


def test_delta_matrix_is_lower_triangular_with_the_beta_weighted_diagonal():
    q, k, _ = qkv(1, 1, 6, 3, 3)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    beta = torch.rand(1, 1, 6, dtype=F64)
    A = delta_matrix(q, k, beta)
    assert torch.equal(A.triu(1), torch.zeros_like(A))
    torch.testing.assert_close(torch.diagonal(A, dim1=-2, dim2=-1), beta * (q * k).sum(-1),
                               **TIGHT)
