"""RetNet, GLA and Mamba-2 (SSD): the chunkwise form against each paper's recurrence.

The reference here is each paper's recurrence written literally, one (batch, head,
position) at a time in float64, in the paper's own terms (RetNet ``S_n = gamma S_{n-1} +
K_n^T V_n``; GLA ``S_t = diag(alpha_t) S_{t-1} + k_t^T v_t`` with ``alpha_t =
sigmoid(.)^(1/tau)`` computed directly, not in log space; Mamba-2 ``h_t = a_t h_{t-1} + B_t
x_t dt_t``, ``y_t = C_t^T h_t``): it shares no code with the mechanisms (chunks, cumulative
log-decays). Then the gate's dense formula, each mechanism's defining property, the
non-causal ``L + U - diag``, key padding, causality, decoding with the state, fla's
references, memory and errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import LargestTensor, assert_causal, saved_numels
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
import attnlab.mechanisms.gated_linear  # noqa: F401  (registers them until __init__ does)
from attnlab.bench.fla_reference import available, load
from attnlab.mechanisms._engines.gated_chunk import chunk_gated, recurrent_gated
from attnlab.nn.cache import state_nbytes

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)
NAMES = ["retnet", "gla", "mamba2"]


def make(name, H=2, D=4, chunk_size=4, seed=0, dtype=F64, **hp):
    """The mechanism with parameters moved away from their initialisation (GLA's bias:
    gates far from 1/2; Mamba-2: A ~ 0.5..2 and dt ~ softplus(N(0, 1)), real forgetting)."""
    torch.manual_seed(seed)
    m = attnlab.create_for(name, head_dim=D, num_heads=H, chunk_size=chunk_size, **hp)
    with torch.no_grad():
        if name == "gla":
            m.b.normal_(0.0, 2.0)
        if name == "mamba2":
            m.A_log.uniform_(-0.7, 0.7)
            m.b_dt.normal_()
    return m.to(dtype)


def qkv(B=2, H=2, N=16, D=4, Dv=4, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, d, generator=g, dtype=F64).to(dtype)
                 for d in (D, D, Dv))


def params(m):
    return tuple(m.parameters())


# ---------------------------------------------------------------- the papers' recurrences
def paper_recurrence(m, q, k, v, scale=None):
    """Each paper's recurrence, literally, per (batch, head, position)."""
    B, H, N, D = q.shape
    name = m.spec.name
    scale = (1.0 if name == "mamba2" else D ** -0.5) if scale is None else scale
    rows = []
    for b in range(B):
        for h in range(H):
            S = torch.zeros(D, v.shape[-1], dtype=F64)
            for t in range(N):
                k_t, v_t = k[b, h, t], v[b, h, t]
                if name == "retnet":
                    gamma = m.hp["gamma"] or 1 - 2.0 ** (-5 - h)
                    S = gamma * S + torch.outer(k_t, v_t)
                elif name == "gla":
                    z = m.W2[h] @ (m.W1[h] @ k_t) + m.b[h]
                    alpha = torch.sigmoid(z) ** (1 / m.hp["temperature"])
                    S = alpha[:, None] * S + torch.outer(k_t, v_t)
                else:  # Mamba-2: C = q, B = k, x = v
                    dt = F.softplus(m.w_dt[h] @ k_t + m.b_dt[h])
                    a = torch.exp(-dt * torch.exp(m.A_log[h]))
                    S = a * S + torch.outer(k_t, v_t) * dt
                rows.append(scale * q[b, h, t] @ S)
    return torch.stack(rows).reshape(B, H, N, -1)


def paper_bidirectional(m, q, k, v, scale=None):
    """Both directions' recurrences, the diagonal (weight 1: q_t . k_t, Mamba-2 times dt_t)
    counted once."""
    fwd = paper_recurrence(m, q, k, v, scale)
    rev = paper_recurrence(m, q.flip(2), k.flip(2), v.flip(2), scale).flip(2)
    eye = torch.eye(q.shape[2], dtype=F64).expand(*q.shape[:2], -1, -1)
    diag = torch.diagonal(paper_recurrence(m, q, k, eye, scale), dim1=-2, dim2=-1)
    return fwd + rev - diag.unsqueeze(-1) * v


def grads(out, *tensors):
    return torch.autograd.grad(out.pow(2).sum(), tensors)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(NAMES), B=st.integers(1, 2), H=st.integers(1, 2),
       N=st.integers(1, 21), D=st.integers(1, 4), Dv=st.integers(1, 4), C=st.integers(1, 9),
       causal=st.booleans(), data=st.data())
def test_chunkwise_equals_the_paper_recurrence_outputs_and_gradients(name, B, H, N, D, Dv, C,
                                                                      causal, data):
    seed = data.draw(st.integers(0, 99))
    hp = {}
    if name == "gla":  # any secondary chunk dividing C
        hp["sub_chunk_size"] = data.draw(st.sampled_from([c for c in range(1, C + 1)
                                                          if C % c == 0]))
    m = make(name, H, D, C, seed, **hp)
    q, k, v = (t.requires_grad_() for t in qkv(B, H, N, D, Dv, seed))
    out = m(q, k, v, is_causal=causal)
    ref = (paper_recurrence if causal else paper_bidirectional)(m, q, k, v)
    torch.testing.assert_close(out, ref, **TIGHT)
    for got, want in zip(grads(out, q, k, v, *params(m)), grads(ref, q, k, v, *params(m)),
                         strict=True):
        torch.testing.assert_close(got, want, **TIGHT)
    dense = m.spec.limit.reference(q.detach(), k.detach(), v.detach(), mech=m, scale=None,
                                   is_causal=causal)
    torch.testing.assert_close(dense, ref.detach(), **TIGHT)


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 40), C=st.sampled_from([1, 2, 4, 6, 8, 12, 16]), per_dim=st.booleans(),
       data=st.data())
def test_engine_chunk_form_equals_its_recurrent_form_from_any_state(N, C, per_dim, data):
    sub = data.draw(st.sampled_from([c for c in range(1, C + 1) if C % c == 0]))
    seed = data.draw(st.integers(0, 99))
    q, k, v = qkv(2, 2, N, 3, 2, seed)
    gen = torch.Generator().manual_seed(seed)
    g = -3 * torch.rand(2, 2, N, 3 if per_dim else 1, generator=gen, dtype=F64)
    S0 = torch.randn(2, 2, 3, 2, generator=gen, dtype=F64)
    o1, S1 = chunk_gated(q, k, v, g, C, S0, sub)
    o2, S2 = recurrent_gated(q, k, v, g, S0)
    torch.testing.assert_close(o1, o2, **TIGHT)
    torch.testing.assert_close(S1, S2, **TIGHT)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name):
    m = make(name, H=1, D=3, chunk_size=4, **({"sub_chunk_size": 2} if name == "gla" else {}))
    q, k, v = (t.requires_grad_() for t in qkv(1, 1, 9, 3, 2))
    for causal in (True, False):
        assert torch.autograd.gradcheck(
            lambda q, k, v, causal=causal: m(q, k, v, is_causal=causal), (q, k, v),
            fast_mode=True)


def test_tiny_per_dimension_gates_do_not_overflow_in_float32():
    """log alpha down to -40 per step: exp(+b) of a naive q exp(b), k exp(-b) split over a
    chunk would be exp(2500); relative to each (sub-)chunk every exponent is <= 0."""
    q, k, v = qkv(1, 2, 130, 8, 4, seed=4, dtype=torch.float32)
    g = -40 * torch.rand(1, 2, 130, 8, generator=torch.Generator().manual_seed(1))
    o, S = chunk_gated(q, k, v, g, 64, sub_chunk=16)
    o64, S64 = recurrent_gated(q.double(), k.double(), v.double(), g.double())
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    # the gate's float32 tolerance, relative to the largest entry (|b| ~ 1e3 in a chunk: the
    # exponents' differences carry float32's rounding of b)
    for got, want in ((o, o64), (S, S64)):
        assert (got.double() - want).abs().max() < 1e-4 * want.abs().max()


# ---------------------------------------------------------------- defining properties
def effective(m, q, k, causal=True, scale=None):
    """The map A of o = A v (v = I)."""
    eye = torch.eye(q.shape[2], dtype=F64).expand(*q.shape[:2], -1, -1)
    return m(q, k, eye, is_causal=causal, scale=scale).detach()


def test_retnet_decays_by_the_papers_gamma_per_head():
    """q = k = u: A_nm = |u|^2 D^-1/2 gamma_h^(n-m), gamma_h = 1 - 2^(-5-h); non-causal
    gamma_h^|n-m|."""
    H, N = 4, 12
    m = make("retnet", H=H, chunk_size=5)
    u = torch.randn(1, H, 1, 4, dtype=F64).expand(1, H, N, 4)
    n = torch.arange(N)
    dist = (n[:, None] - n[None, :]).double()
    for causal in (True, False):
        A = effective(m, u, u, causal)
        for h in range(H):
            gamma = 1 - 2.0 ** (-5 - h)
            want = (u[0, h, 0] @ u[0, h, 0]) * 0.5 * gamma ** dist.abs()
            torch.testing.assert_close(A[0, h], want.tril() if causal else want, **TIGHT)


@pytest.mark.parametrize("causal", [True, False])
def test_retnet_with_gamma_one_is_unnormalised_linear_attention(causal):
    m = make("retnet", chunk_size=3, gamma=1.0)
    q, k, v = qkv(N=11)
    scores = q @ k.transpose(-1, -2) * 0.5
    want = (scores.tril() if causal else scores) @ v
    torch.testing.assert_close(m(q, k, v, is_causal=causal), want, **TIGHT)


def test_gla_decays_each_key_dimension_by_its_own_gate():
    """q = e_d, k = e_d: A_ij = prod_{r=j+1..i} alpha_rd, a different decay per dimension;
    q = e_d, k = e_d' (d != d'): nothing. alpha = sigmoid(W2 W1 k + b)^(1/16) from the key."""
    m = make("gla", H=1, D=3, chunk_size=8, sub_chunk_size=2)
    N = 10
    k_gate = torch.randn(1, 1, N, 3, dtype=F64)            # the keys the gates come from
    alpha = torch.sigmoid(k_gate[0, 0] @ (m.W2[0] @ m.W1[0]).T + m.b[0]) ** (1 / 16)
    torch.testing.assert_close(m.log_alpha(k_gate)[0, 0].exp(), alpha, **TIGHT)
    assert (alpha.std(dim=1) > 1e-2).all()  # the dimensions decay at different rates
    # the gates read k, so probe each dimension through v: o_i = sum_j A_ij v_j with q = e_d
    eye = torch.eye(N, dtype=F64).reshape(1, 1, N, N)
    for d in range(3):
        e_d = F.one_hot(torch.full((1, 1, N), d), 3).double()
        A = m(e_d, k_gate, eye * k_gate[..., d:d + 1].reciprocal().transpose(-1, -2),
              is_causal=True, scale=1.0).detach()[0, 0]
        for i in range(N):
            for j in range(i + 1):
                torch.testing.assert_close(A[i, j], alpha[j + 1:i + 1, d].prod(), **TIGHT)


def test_mamba2_forgets_by_one_scalar_per_head_and_step():
    """M_ts / ((C_t . B_s) dt_s) = prod_{r=s+1..t} a_r, a_r = exp(-dt_r A): the same for
    every key dimension and every pair (s, t) across a step."""
    m = make("mamba2", H=2, chunk_size=4)
    q, k, _ = qkv(1, 2, 12, 4, 4, seed=3)
    M = effective(m, q, k)
    dt = F.softplus(torch.einsum("bhnd,hd->bhn", k, m.w_dt) + m.b_dt[:, None]).detach()
    a = torch.exp(-dt * m.A_log.exp()[:, None]).detach()
    ratio = M / (q @ k.transpose(-1, -2) * dt[:, :, None, :])
    for t in range(12):
        for s in range(t + 1):
            torch.testing.assert_close(ratio[..., t, s], a[..., s + 1:t + 1].prod(-1), **TIGHT)
    # A -> 0: no forgetting, y = tril(C B^T) (dt x): the dt-discretised input alone
    with torch.no_grad():
        m.A_log.fill_(-80.0)
    torch.testing.assert_close(effective(m, q, k), (q @ k.transpose(-1, -2)).tril() * dt[:, :, None, :],
                               **TIGHT)


@pytest.mark.parametrize("name", NAMES)
def test_every_block_below_the_diagonal_has_rank_at_most_the_state(name):
    """The semiseparable structure of state-space duality: the map's block M[t:, :t] factors
    through the (Dk, Dv) state, so its rank is <= Dk = 2 (softmax attention's is full)."""
    m = make(name, H=1, D=2, chunk_size=4)
    q, k, _ = qkv(1, 1, 14, 2, 2, seed=5)
    M = effective(m, q, k)[0, 0]
    for t in range(2, 12):
        assert torch.linalg.matrix_rank(M[t:, :t], atol=1e-9) <= 2
    full = torch.softmax(q @ k.transpose(-1, -2), -1).tril()[0, 0]
    assert torch.linalg.matrix_rank(full[7:, :7], atol=1e-9) > 2


@pytest.mark.parametrize("name", NAMES)
def test_non_causal_map_is_l_plus_u_minus_the_diagonal(name):
    m = make(name, H=1, chunk_size=4)
    q, k, _ = qkv(1, 1, 9, 4, 4, seed=6)
    L = effective(m, q, k)
    U = effective(m, q.flip(2), k.flip(2)).flip(-2, -1)
    assert torch.equal(L.triu(1), torch.zeros_like(L)) and torch.equal(U.tril(-1), torch.zeros_like(U))
    torch.testing.assert_close(torch.diagonal(L, dim1=-2, dim2=-1),
                               torch.diagonal(U, dim1=-2, dim2=-1), **TIGHT)
    diag = torch.diag_embed(torch.diagonal(L, dim1=-2, dim2=-1))
    torch.testing.assert_close(effective(m, q, k, causal=False), L + U - diag, **TIGHT)


# ---------------------------------------------------------------- key padding
@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(NAMES), keep=st.lists(st.booleans(), min_size=1, max_size=13),
       causal=st.booleans(), C=st.integers(1, 6), seed=st.integers(0, 99))
def test_padded_positions_are_removed_exactly(name, keep, causal, C, seed):
    keep = torch.tensor(keep)
    keep[seed % len(keep)] = True
    N, real = len(keep), keep.nonzero().flatten()
    m = make(name, chunk_size=C, seed=seed, **({"sub_chunk_size": 1} if name == "gla" else {}))
    noisy = [torch.where(keep[:, None], x, 50 * torch.randn_like(x) + 7)
             for x in qkv(1, 2, N, 4, 3, seed)]
    q, k, v = (x.requires_grad_() for x in noisy)
    out = m(q, k, v, attn_mask=keep.reshape(1, 1, 1, N), is_causal=causal)[:, :, real]
    alone = m(q[:, :, real], k[:, :, real], v[:, :, real], is_causal=causal)
    torch.testing.assert_close(out, alone, **TIGHT)
    gq, gk, gv = grads(out, q, k, v)
    assert all((g[:, :, ~keep] == 0).all() for g in (gq, gk, gv))


# ---------------------------------------------------------------- causality
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_future_tokens_do_not_change_the_past(name, chunk_size):
    assert_causal(make(name, chunk_size=chunk_size, **({"sub_chunk_size": 1} if name == "gla" else {})), *qkv(N=13), t=6)


# ---------------------------------------------------------------- decoding
def decode_in(m, q, k, v, sizes):
    outs, state, t = [], None, 0
    for s in sizes:
        o, new = m.decode(q[:, :, t:t + s], k[:, :, t:t + s], v[:, :, t:t + s], state)
        outs.append(o)
        state, t = new, t + s
    return torch.cat(outs, dim=2), state


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(NAMES), data=st.data())
def test_decoding_in_any_chunks_equals_the_full_causal_forward(name, data):
    N = data.draw(st.integers(1, 24))
    sizes, left = [], N
    while left:
        sizes.append(data.draw(st.integers(1, left)))
        left -= sizes[-1]
    m = make(name, chunk_size=data.draw(st.sampled_from([1, 2, 4, 8])))
    q, k, v = qkv(N=N, Dv=3, seed=data.draw(st.integers(0, 99)))
    out, state = decode_in(m, q, k, v, sizes)
    torch.testing.assert_close(out, m(q, k, v, is_causal=True), **TIGHT)
    assert state["t"] == N and state["S"].shape == (2, 2, 4, 3)


@pytest.mark.parametrize("name", NAMES)
def test_token_by_token_state_is_constant_in_size_and_never_modified(name):
    m = make(name)
    q, k, v = qkv(N=30)
    state, sizes = None, set()
    for t in range(30):
        before = None if state is None else state["S"].clone()
        _, new = m.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        if state is not None:
            assert torch.equal(state["S"], before) and new["S"] is not state["S"]
        sizes.add(state_nbytes(new))
        state = new
    assert sizes == {2 * 2 * 4 * 4 * 8}
    torch.testing.assert_close(state["S"], decode_in(m, q, k, v, [30])[1]["S"], **TIGHT)


# The largest intermediate per (batch, head) is N max(C, c D) (GLA's diagonal sub-blocks
# c x c x D): 64 N with C <= 32, c = 8, D = 8, linear in N.
SUB8 = {"gla": {"sub_chunk_size": 8}}


@pytest.mark.parametrize("name", NAMES)
def test_a_long_prefill_is_chunkwise_without_an_n_by_n_tensor(name):
    N = 1024
    m = make(name, H=1, D=8, chunk_size=32, dtype=torch.float32, **SUB8.get(name, {}))
    q, k, v = qkv(1, 1, N, 8, 8, dtype=torch.float32)
    with torch.no_grad(), LargestTensor() as probe:
        out, state = m.decode(q, k, v)
    assert probe.largest <= N * 64 < N * N // 4 and state["t"] == N
    torch.testing.assert_close(out, m(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_the_state_in_float32(name, dtype):
    m = make(name, dtype=dtype)
    q, k, v = qkv(dtype=dtype)
    out, state = m.decode(q, k, v)
    assert out.dtype == dtype and state["S"].dtype == torch.float32
    assert m.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)[0].dtype == dtype
    ref = m.spec.limit.reference(q.double(), k.double(), v.double(), mech=m, scale=None,
                                 is_causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------- fla's references
needs_fla = pytest.mark.skipif(not available(), reason="fla-core not installed")
FLA_TOL = dict(rtol=1e-5, atol=1e-5)  # fla's naive ops compute in float32


def bthd(x):
    return x.transpose(1, 2)


@needs_fla
def test_retnet_equals_fla_naive_retention():
    m = make("retnet", H=4, D=8, chunk_size=16)
    q, k, v = qkv(2, 4, 45, 8, 6, seed=2)
    want = load("retention").naive_retention(q, k, v).double()
    torch.testing.assert_close(m(q, k, v, is_causal=True), want, **FLA_TOL)


@needs_fla
def test_gla_equals_fla_naive_recurrent_gla_with_the_same_log_gates():
    m = make("gla", H=2, D=8, chunk_size=16, sub_chunk_size=4)
    q, k, v = qkv(2, 2, 37, 8, 6, seed=2)
    gk = m.log_alpha(k).detach()
    o, S = load("gla").naive_recurrent_gla(bthd(q), bthd(k), bthd(v), bthd(gk),
                                           output_final_state=True)
    torch.testing.assert_close(m(q, k, v, is_causal=True).detach(), bthd(o).double(), **FLA_TOL)
    torch.testing.assert_close(m.decode(q, k, v)[1]["S"], S.double(), **FLA_TOL)


@needs_fla
def test_mamba2_equals_fla_simple_gla_with_g_log_a_and_dt_scaled_values():
    fla = load("simple_gla")
    m = make("mamba2", H=2, D=8, chunk_size=16)
    q, k, v = qkv(2, 2, 50, 8, 6, seed=2)
    dt = m.dt(k).detach()
    g = -dt * m.A_log.exp().detach()[:, None]
    x = v * dt.unsqueeze(-1)
    ours = m(q, k, v, is_causal=True).detach()
    o, S = fla.naive_recurrent_simple_gla(bthd(q), bthd(k), bthd(x), bthd(g), scale=1.0)
    torch.testing.assert_close(ours, bthd(o).double(), **FLA_TOL)
    torch.testing.assert_close(m.decode(q, k, v)[1]["S"], S.double(), **FLA_TOL)
    o, _ = fla.naive_chunk_simple_gla(bthd(q), bthd(k), bthd(x), bthd(g), chunk_size=16,
                                      scale=1.0)
    torch.testing.assert_close(ours, bthd(o).double(), **FLA_TOL)


# ---------------------------------------------------------------- memory, flags, errors
@pytest.mark.parametrize("name", NAMES)
def test_training_memory_is_sub_quadratic(name):
    N = 512
    m = make(name, H=1, D=8, chunk_size=16, dtype=torch.float32, **SUB8.get(name, {}))
    q, k, v = (t.requires_grad_() for t in qkv(1, 1, N, 8, 8, dtype=torch.float32))
    for causal in (True, False):
        with saved_numels() as saved, LargestTensor() as probe:
            m(q, k, v, is_causal=causal).sum().backward()
        assert max(saved) <= N * 64 and probe.largest <= N * 64 < N * N // 4


def test_flags_are_honest():
    for name, alias, learnable in (("retnet", "retention", False), ("gla", "gla", True),
                                   ("mamba2", "ssd", True)):
        s = attnlab.get(alias)
        assert s.name == name and s.family == "gated_linear"
        assert (s.causal, s.decode_state, s.exact, s.learnable) == (True, True, False, learnable)
        assert s.key_padding and not (s.cross or s.arbitrary_mask or s.kv_cache)
        assert "N^2" not in s.memory and s.hparam("chunk_size").default == 64
    assert attnlab.create("mamba2", head_dim=4, num_heads=1).default_scale(4) == 1.0
    assert attnlab.create("retnet").default_scale(4) == 0.5


@pytest.mark.parametrize("name,hp,exc,pattern", [
    ("retnet", {"chunk_size": 0}, ValueError, r"'chunk_size' must be >= 1; got 0"),
    ("retnet", {"chunk_size": 2.5}, TypeError, r"'chunk_size' must be an int; got float"),
    ("retnet", {"gamma": 1.5}, ValueError, r"'gamma' must be > 0.0 and <= 1.0; got 1.5"),
    ("retnet", {"gamma": 0.0}, ValueError, r"'gamma' must be > 0.0 and <= 1.0; got 0.0"),
    ("gla", {"temperature": 0.0}, ValueError, r"'temperature' must be > 0.0; got 0.0"),
    ("gla", {"gate_rank": 0}, ValueError, r"'gate_rank' must be >= 1; got 0"),
    ("gla", {"chunk_size": 8, "sub_chunk_size": 3}, ValueError,
     r"'sub_chunk_size' must divide 'chunk_size'=8 .*; got 3"),
    ("mamba2", {"chunk": 4}, TypeError, r"unknown hyperparameter 'chunk'.*chunk_size"),
])
def test_bad_hyperparameters_are_named(name, hp, exc, pattern):
    with pytest.raises(exc, match=pattern):
        attnlab.create_for(name, head_dim=4, num_heads=2, **hp)


@pytest.mark.parametrize("name", ["gla", "mamba2"])
def test_required_sizes_and_call_time_errors_are_clear(name):
    with pytest.raises(ValueError, match="'num_heads' is required"):
        attnlab.create(name, head_dim=4)
    m = make(name)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"{name}: num_heads=2 .* does not match the H heads "
                                         r"of q, 3"):
        m(*qkv(H=3))
    with pytest.raises(ValueError, match=r"head_dim=4 .* head dim D of q, 5"):
        m(*qkv(D=5))
    with pytest.raises(ValueError, match="dropout_p=0.1 is not supported"):
        m(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="needs Nq == Nk"):
        m(q[:, :, :5], k, v)


def test_retnet_is_functional_for_any_number_of_heads():
    """No parameters, no num_heads: gamma_h follows the head index of the call."""
    q, k, v = qkv(H=3, N=7)
    out = attnlab.attention(q, k, v, mechanism="retention", is_causal=True)
    torch.testing.assert_close(out[:, :2], attnlab.attention(q[:, :2], k[:, :2], v[:, :2],
                                                             mechanism="retnet", is_causal=True))
