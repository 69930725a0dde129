"""Low-rank family (``linformer``, ``nystromformer``): limit cases, formulas, memory, errors.

Limit cases. Linformer with ``k = Nk = max_seq_len`` and ``E = F = I`` *is* exact
attention (outputs and gradients within 1e-5 in float32). Nyströmformer with one landmark
per token (``m = N``) is ``S S^+ S V = S V`` in exact arithmetic; in floating point the
product ``S (S^+ (S V))`` is accurate to about ``eps * cond(S)``, and its gradient adds
terms of size ``cond(S)^2`` that cancel only in exact arithmetic. Hence the documented
tolerances: float32 outputs within 1e-4 (``pinv="exact"``) or 1e-3 (iterative, 40 steps)
where ``cond(S) <= 1e4`` (the usual case for D >= 4); gradients in float64 only.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as nnf
from conftest import naive_attention_f64, saved_numels
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.mechanisms.low_rank import iterative_pinv, segment_means

REF = attnlab.create("reference")


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def qkv(B, H, Nq, Nk, D, Dv, dtype=torch.float32, seed=0):
    return (rand(B, H, Nq, D, dtype=dtype, seed=seed), rand(B, H, Nk, D, dtype=dtype, seed=seed + 1),
            rand(B, H, Nk, Dv, dtype=dtype, seed=seed + 2))


def out_and_grads(mech, q, k, v, w):
    """Output and the gradients of <out, w> with respect to q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = mech(q, k, v)
    (out * w).sum().backward()
    return [out.detach(), q.grad, k.grad, v.grad]


def assert_all_close(got, want, atol, rtol=0.0):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def saved_during_forward(mech, q, k, v):
    """numel of every tensor autograd saves for backward during one forward."""
    with saved_numels() as sizes:
        out = mech(q, k, v)
    out.sum().backward()
    return sizes


# =============================================================================== Linformer
@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), Nq=st.integers(1, 12), N=st.integers(1, 12),
       D=st.integers(1, 6), Dv=st.integers(1, 5),
       sharing=st.sampled_from(["none", "headwise", "kv", "layerwise"]), seed=st.integers(0, 99))
def test_linformer_identity_projections_are_exact_attention(B, H, Nq, N, D, Dv, sharing, seed):
    q, k, v = qkv(B, H, Nq, N, D, Dv, seed=seed)
    w = rand(B, H, Nq, Dv, seed=seed + 3)
    lin = attnlab.create("linformer", max_seq_len=N, k=N, init="identity", sharing=sharing,
                         num_heads=H)
    got, want = out_and_grads(lin, q, k, v, w), out_and_grads(REF, q, k, v, w)
    assert_all_close(got, want, atol=1e-5)
    torch.testing.assert_close(got[0].double(), naive_attention_f64(q, k, v), atol=1e-5, rtol=0)


def linformer_f64(mech, q, k, v, scale):
    """softmax(Q (E[:, :n] K)^T * scale) (F[:, :n] V), per batch and head, in float64."""
    n = k.shape[-2]
    E = mech.E.detach().double()[..., :n]
    F = mech.F.detach().double()[..., :n] if hasattr(mech, "F") else E
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            Eh, Fh = (M[h] if M.dim() == 3 else M for M in (E, F))
            kb, vb = Eh @ k[b, h].double(), Fh @ v[b, h].double()
            out[b, h] = torch.softmax(q[b, h].double() @ kb.T * scale, -1) @ vb
    return out


@pytest.mark.parametrize("sharing", ["none", "headwise", "kv", "layerwise"])
@pytest.mark.parametrize("init", ["xavier", "normal"])
def test_linformer_matches_the_formula_for_shorter_and_cross_inputs(sharing, init):
    torch.manual_seed(0)
    lin = attnlab.create("linformer", max_seq_len=20, k=6, sharing=sharing, init=init, num_heads=3)
    q, k, v = qkv(2, 3, 9, 13, 5, 4)  # Nk = 13 < max_seq_len = 20: E[:, :13]
    k.requires_grad_()
    out = lin(q, k, v, scale=0.3)
    torch.testing.assert_close(out.double(), linformer_f64(lin, q, k, v, 0.3), atol=1e-5, rtol=0)
    out.pow(2).sum().backward()
    # Only the first Nk columns of E are used, so only they get a gradient.
    assert lin.E.grad[..., :13].abs().max() > 0 and lin.E.grad[..., 13:].abs().max() == 0
    assert torch.isfinite(k.grad).all()


def test_linformer_sharing_modes_own_the_papers_parameters():
    def count(**hp):
        return sum(p.numel() for p in attnlab.create("linformer", max_seq_len=10, k=4, **hp)
                   .parameters())

    assert count(sharing="none", num_heads=3) == 2 * 3 * 4 * 10  # E_i, F_i per head
    assert count(sharing="headwise") == 2 * 4 * 10               # E, F for all heads
    assert count(sharing="kv") == 4 * 10                         # E = F
    first = attnlab.create("linformer", max_seq_len=10, k=4, sharing="layerwise")
    second = attnlab.create("linformer", max_seq_len=10, k=4, sharing="layerwise",
                            shared_projection=first.E)
    assert second.E is first.E
    model = torch.nn.ModuleList([first, second])
    assert sum(p.numel() for p in model.parameters()) == 4 * 10  # one E for every layer
    q, k, v = qkv(1, 2, 10, 10, 3, 3)
    out_first = first(q, k, v)
    (out_first + second(out_first, out_first, out_first)).sum().backward()
    only_first = torch.autograd.grad(first(q, k, v).sum(), first.E)[0]
    assert not torch.allclose(first.E.grad, only_first)  # both layers' uses accumulate


def test_linformer_inits():
    eye = attnlab.create("linformer", max_seq_len=5, k=5, init="identity", sharing="none",
                         num_heads=2)
    torch.testing.assert_close(eye.E.detach(), torch.eye(5).expand(2, 5, 5))
    torch.manual_seed(0)
    normal = attnlab.create("linformer", max_seq_len=400, k=100, init="normal")
    assert abs(normal.E.std().item() - 0.1) < 0.005  # N(0, 1/k): std 1/sqrt(100)
    xavier = attnlab.create("linformer", max_seq_len=400, k=100)
    bound = math.sqrt(6.0 / 500) / math.sqrt(2.0)  # fairseq: xavier_uniform, gain 1/sqrt(2)
    assert xavier.E.abs().max() <= bound and xavier.E.abs().max() > 0.9 * bound


BAD_LINFORMER = [
    (dict(max_seq_len=8, k=0), ValueError, r"linformer: hyperparameter 'k' must be >= 1; got 0"),
    (dict(k=4), ValueError, r"linformer: hyperparameter 'max_seq_len' is required"),
    (dict(max_seq_len=8, k=4, init="identity"), ValueError,
     r"linformer: init='identity' needs k == max_seq_len; got k=4, max_seq_len=8"),
    (dict(max_seq_len=8, sharing="none"), ValueError, r"linformer: sharing='none' .* needs num_heads"),
    (dict(max_seq_len=8, sharing="both"), ValueError, r"'sharing' must be one of"),
    (dict(max_seq_len=8, k=4, shared_projection=torch.nn.Parameter(torch.zeros(4, 8))),
     ValueError, r"shared_projection is only used with sharing='layerwise'; got sharing='headwise'"),
    (dict(max_seq_len=8, k=4, sharing="layerwise", shared_projection=torch.nn.Parameter(torch.zeros(4, 9))),
     ValueError, r"shared_projection must have shape \(k, max_seq_len\) = \(4, 8\); got \(4, 9\)"),
    (dict(max_seq_len=8, k=4, sharing="layerwise", shared_projection=torch.zeros(4, 8)),
     TypeError, r"shared_projection must be an nn.Parameter; got Tensor"),
]


@pytest.mark.parametrize("hp,exc,pattern", BAD_LINFORMER)
def test_linformer_bad_hyperparameters(hp, exc, pattern):
    with pytest.raises(exc, match=pattern):
        attnlab.create("linformer", **hp)


def test_linformer_call_time_errors():
    lin = attnlab.create("linformer", max_seq_len=8, k=4)
    q, k, v = qkv(1, 2, 9, 9, 4, 4)
    with pytest.raises(ValueError, match=r"linformer: key length N=9 exceeds max_seq_len=8"):
        lin(q, k, v)
    per_head = attnlab.create("linformer", max_seq_len=9, k=4, sharing="none", num_heads=3)
    with pytest.raises(ValueError, match=r"built for num_heads=3; got H=2"):
        per_head(q, k, v)


# =========================================================================== Nyströmformer
def segments(n, m):
    """Segment i holds tokens ceil(i n / m) .. ceil((i + 1) n / m) - 1 (written with ints)."""
    return [(-(-i * n // m), -(-(i + 1) * n // m)) for i in range(m)]


def nystrom_f64(q, k, v, m, scale, conv_weight=None):
    """The paper's formula, literally, per batch and head, with torch.linalg.pinv."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            Q, K, V = q[b, h], k[b, h], v[b, h]
            Ql = torch.stack([Q[lo:hi].mean(0) for lo, hi in segments(Q.shape[0], m)])
            Kl = torch.stack([K[lo:hi].mean(0) for lo, hi in segments(K.shape[0], m)])
            f1 = torch.softmax(Q @ Kl.T * scale, -1)
            A = torch.softmax(Ql @ Kl.T * scale, -1)
            f3 = torch.softmax(Ql @ K.T * scale, -1)
            out[b, h] = f1 @ torch.linalg.pinv(A) @ f3 @ V
            if conv_weight is not None:  # depthwise conv over the sequence, zero padded
                w = conv_weight[h, 0, :, 0].double()
                r = len(w) // 2
                Vp = nnf.pad(V, (0, 0, r, r))
                out[b, h] += sum(w[t] * Vp[t:t + V.shape[0]] for t in range(len(w)))
    return out


def cond(q, k, scale):
    S = torch.softmax(q.double() @ k.double().transpose(-2, -1) * scale, -1)
    return torch.linalg.cond(S).max().item()


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 16), D=st.integers(4, 8),
       pinv=st.sampled_from(["exact", "iterative"]), seed=st.integers(0, 999))
def test_nystrom_one_landmark_per_token_is_exact_float32(B, H, N, D, pinv, seed):
    q, k, v = qkv(B, H, N, N, D, D, seed=seed)
    c = cond(q, k, D ** -0.5)
    assume(c <= 1e4)
    ny = attnlab.create("nystromformer", num_landmarks=N, pinv=pinv, pinv_iterations=40)
    # A float32 (pseudo-)inverse is accurate to about cond * eps: the tolerance follows it
    # (seed 141, N = 12 has cond 5.2e3, an error of 2.3e-4 within cond * eps = 6.2e-4).
    tol = max(1e-4 if pinv == "exact" else 1e-3, c * torch.finfo(torch.float32).eps)
    torch.testing.assert_close(ny(q, k, v).double(), naive_attention_f64(q, k, v), atol=tol, rtol=0)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 12), D=st.integers(2, 6),
       pinv=st.sampled_from(["exact", "iterative"]), seed=st.integers(0, 999))
def test_nystrom_one_landmark_per_token_is_exact_with_gradients_float64(B, H, N, D, pinv, seed):
    q, k, v = qkv(B, H, N, N, D, D, dtype=torch.float64, seed=seed)
    c = cond(q, k, D ** -0.5)
    assume(c <= 1e4)
    w = rand(B, H, N, D, dtype=torch.float64, seed=seed + 3)
    ny = attnlab.create("nystromformer", num_landmarks=N, pinv=pinv, pinv_iterations=40)
    got, want = out_and_grads(ny, q, k, v, w), out_and_grads(REF, q, k, v, w)
    # torch.linalg.pinv's backward (A+ dA A+ terms) is accurate to about cond^2 * eps, not
    # cond * eps: over 3,000 seeded draws its error was at most 110 cond^2 eps (1.09e-6 at
    # cond 6.7e3, N = 11, D = 3, seed 185), so the bound follows cond^2 with a margin of 4.
    # Differentiating the iteration keeps 1e-8.
    eps = torch.finfo(torch.float64).eps
    exact_tol = max(1e-8, 500 * c * c * eps)
    assert_all_close(got, want, atol=exact_tol if pinv == "exact" else 1e-8)


@pytest.mark.parametrize("Nq,Nk,m", [(16, 16, 4), (17, 17, 16), (13, 13, 5), (9, 14, 3)])
def test_nystrom_matches_the_formula_with_uneven_segments_and_cross(Nq, Nk, m):
    q, k, v = qkv(2, 2, Nq, Nk, 4, 3, dtype=torch.float64)
    q, k = q * 0.5, k * 0.5  # moderate logits keep the landmark kernel invertible
    ny = attnlab.create("nystromformer", num_landmarks=m, pinv="exact")
    torch.testing.assert_close(ny(q, k, v, scale=0.7), nystrom_f64(q, k, v, m, 0.7),
                               atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("n,m", [(12, 4), (12, 12), (17, 16), (7, 3), (5, 1)])
def test_segment_means_are_contiguous_nonempty_and_the_papers_when_m_divides_n(n, m):
    x = rand(2, n, 3, dtype=torch.float64)
    want = torch.stack([x[:, lo:hi].mean(1) for lo, hi in segments(n, m)], dim=1)
    torch.testing.assert_close(segment_means(x, m), want)
    sizes = [hi - lo for lo, hi in segments(n, m)]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    if n % m == 0:
        torch.testing.assert_close(segment_means(x, m), x.reshape(2, m, n // m, 3).mean(2))


def test_iterative_pinv_starts_as_the_paper_and_converges_to_the_pseudo_inverse():
    A = torch.tensor([[2.0, -1.0], [0.5, 3.0]], dtype=torch.float64)
    # ||A||_1 = max column sum = 4, ||A||_inf = max row sum = 3.5; Z_1 is one step from Z_0.
    Z0 = A.T / (4.0 * 3.5)
    AZ = A @ Z0
    Z1 = 0.25 * Z0 @ (13 * torch.eye(2) - AZ @ (15 * torch.eye(2) - AZ @ (7 * torch.eye(2) - AZ)))
    torch.testing.assert_close(iterative_pinv(A, 1), Z1)
    g = torch.Generator().manual_seed(0)
    full = torch.softmax(torch.randn(3, 6, 6, generator=g, dtype=torch.float64) * 2, -1)
    torch.testing.assert_close(iterative_pinv(full, 40), torch.linalg.pinv(full), atol=1e-10,
                               rtol=0)
    # Rank 3 of 5: the iteration converges to A^+, not to an inverse. (Not run for long:
    # rounding noise in the null space grows 3.25x per step and takes over after ~20.)
    low = torch.randn(5, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 5, generator=g,
                                                                           dtype=torch.float64)
    torch.testing.assert_close(iterative_pinv(low, 12), torch.linalg.pinv(low), atol=1e-9, rtol=0)


def ar1(B, H, N, D, corr, seed):
    """Sequences whose neighbouring tokens are alike (AR(1) along N, unit variance)."""
    x = rand(B, H, N, D, dtype=torch.float64, seed=seed)
    for i in range(1, N):
        x[:, :, i] = corr * x[:, :, i - 1] + math.sqrt(1 - corr ** 2) * x[:, :, i]
    return x


def test_nystrom_error_decreases_as_landmarks_grow_toward_n():
    # Segment-mean landmarks summarise neighbourhoods; iid noise has none (every segment
    # mean is ~0), so inputs are locally correlated, as text and image tokens are.
    landmarks, seeds = [1, 2, 4, 8, 16, 32], range(8)
    errors = torch.zeros(len(seeds), len(landmarks))
    for s in seeds:
        q, k, v = (ar1(1, 2, 32, 8, 0.97, seed=10 * s + i) for i in range(3))
        exact = naive_attention_f64(q, k, v)
        for j, m in enumerate(landmarks):  # default: the paper's 6-step iterative pinv
            out = attnlab.create("nystromformer", num_landmarks=m)(q, k, v)
            errors[s, j] = (out - exact).norm() / exact.norm()
    mean = errors.mean(0)
    assert (mean[1:] <= mean[:-1]).all(), f"mean relative error by m={landmarks}: {mean}"
    assert mean[-1] < mean[0] / 5


def test_nystrom_conv_residual_is_the_papers_depthwise_conv():
    ny = attnlab.create("nystromformer", num_landmarks=4, pinv="exact", conv_kernel=3,
                        num_heads=2).double()
    assert sum(p.numel() for p in ny.parameters()) == 2 * 3  # one (3, 1) filter per head
    q, k, v = qkv(2, 2, 12, 12, 4, 3, dtype=torch.float64)
    q, k = q * 0.5, k * 0.5
    out = ny(q, k, v, scale=0.7)
    torch.testing.assert_close(out, nystrom_f64(q, k, v, 4, 0.7, ny.conv.weight.detach()),
                               atol=1e-8, rtol=1e-8)
    out.sum().backward()
    assert ny.conv.weight.grad.abs().max() > 0


def test_dropout_is_random_reproducible_and_off_at_zero():
    for mech in (attnlab.create("linformer", max_seq_len=16, k=8),
                 attnlab.create("nystromformer", num_landmarks=4)):
        q, k, v = qkv(1, 2, 16, 16, 4, 4)
        torch.manual_seed(1)
        a = mech(q, k, v, dropout_p=0.5)
        torch.manual_seed(1)
        b = mech(q, k, v, dropout_p=0.5)
        torch.testing.assert_close(a, b)
        assert torch.isfinite(a).all() and not torch.allclose(a, mech(q, k, v))
        torch.testing.assert_close(mech(q, k, v), mech(q, k, v, dropout_p=0.0))


BAD_NYSTROM = [
    (dict(num_landmarks=0), ValueError, r"nystromformer: hyperparameter 'num_landmarks' must be >= 1; got 0"),
    (dict(pinv_iterations=0), ValueError, r"'pinv_iterations' must be >= 1; got 0"),
    (dict(pinv="svd"), ValueError, r"'pinv' must be one of \['iterative', 'exact'\]"),
    (dict(conv_kernel=4, num_heads=2), ValueError, r"nystromformer: conv_kernel must be odd .* got 4"),
    (dict(conv_kernel=3), ValueError, r"nystromformer: conv_kernel needs num_heads"),
]


@pytest.mark.parametrize("hp,exc,pattern", BAD_NYSTROM)
def test_nystrom_bad_hyperparameters(hp, exc, pattern):
    with pytest.raises(exc, match=pattern):
        attnlab.create("nystromformer", **hp)


def test_nystrom_call_time_errors():
    q, k, v = qkv(1, 2, 32, 32, 4, 4)
    with pytest.raises(ValueError, match=r"nystromformer: num_landmarks=64 must be <= N=32"):
        attnlab.create("nystromformer", num_landmarks=64)(q, k, v)
    with pytest.raises(ValueError, match=r"num_landmarks=16 must be <= min\(Nq, Nk\)=8 "
                                         r"\(Nq=32, Nk=8\)"):
        attnlab.create("nystromformer", num_landmarks=16)(q, k[:, :, :8], v[:, :, :8])
    conv = attnlab.create("nystromformer", num_landmarks=4, conv_kernel=3, num_heads=2)
    with pytest.raises(ValueError, match=r"needs Nq == Nk; got Nq=32, Nk=8"):
        conv(q, k[:, :, :8], v[:, :, :8])
    with pytest.raises(ValueError, match=r"built for num_heads=2; got H=1"):
        conv(q[:, :1], k[:, :1], v[:, :1])


# ==================================================================================== both
BOTH = [("linformer", dict(max_seq_len=2048, k=32)), ("nystromformer", dict(num_landmarks=32))]


@pytest.mark.parametrize("name,hp", BOTH, ids=[b[0] for b in BOTH])
def test_saved_tensors_are_linear_in_n_never_n_by_n(name, hp):
    N, D = 2048, 16
    q, k, v = (t.requires_grad_() for t in qkv(1, 1, N, N, D, D))
    sizes = saved_during_forward(attnlab.create(name, **hp), q, k, v)
    assert sizes and max(sizes) <= 2 * N * 32, f"{name}: largest saved tensor {max(sizes)}"
    assert sum(sizes) < N * N / 8


@pytest.mark.parametrize("name", ["linformer", "nystromformer"])
def test_no_causal_form_and_no_masks(name):
    mech = attnlab.create_for(name, head_dim=4, num_heads=2, max_seq_len=16,
                              **attnlab.get(name).tiny_hparams)
    q, k, v = qkv(1, 2, 16, 16, 4, 4)
    with pytest.raises(ValueError, match=rf"{name} has no causal form"):
        mech(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match=rf"{name} cannot take an arbitrary attn_mask"):
        mech(q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.bool))


@pytest.mark.parametrize("name", ["linformer", "nystromformer"])
def test_defaults_give_finite_gradients_everywhere(name):
    torch.manual_seed(0)
    mech = attnlab.create_for(name, head_dim=8, num_heads=2, max_seq_len=64)
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 64, 64, 8, 8))
    out = mech(q, k, v)
    out.pow(2).sum().backward()
    for t in (out, q.grad, k.grad, v.grad, *(p.grad for p in mech.parameters())):
        assert torch.isfinite(t).all() and t.abs().max() > 0
