"""Fourier token mixing (attnlab.mechanisms.fourier): FNet and the 1-D global filter.

Evidence. FNet: equals ``Re(torch.fft.fft2(v))`` and the complex DFT-matrix product
``Re(F_N v F_D)`` (hypothesis over shapes), and the module's own real cos/sin reference;
it has no parameters and ignores ``q, k`` (zero gradients, not ``None``); its gradient is
the same transform (DFT matrices are symmetric); in a one-head layer with identity
projections it is the paper's Fourier sublayer. Global filter: an all-ones filter is the
identity; it equals the circulant built from ``irfft(K)`` (its lower triangle when causal)
and the module's explicit inverse-DFT reference; it commutes with circular shifts (its
defining property) and the causal form with delays; gradients reach the filter
(gradcheck); other lengths resample the filter linearly in frequency, or are refused.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import attnlab
import attnlab.mechanisms.fourier  # noqa: F401
from attnlab.mechanisms.fourier import fnet_reference, global_filter_reference, resample_filter
from attnlab.nn import MultiheadAttention
from attnlab.verify import verify

TIGHT = dict(rtol=1e-10, atol=1e-11)


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dft(n: int) -> torch.Tensor:
    """``F[j, k] = exp(-2 pi i j k / n)``, complex128."""
    j = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * torch.outer(j, j) / n)


def gfilter(D=3, H=2, L=8, seed=0, **hp):
    torch.manual_seed(seed)
    m = attnlab.create("global_filter", head_dim=D, num_heads=H, max_seq_len=L, **hp).double()
    with torch.no_grad():  # unit-size filters: outputs of unit size, errors comparable
        m.complex_weight.copy_(rand(*m.complex_weight.shape, seed=seed + 1))
    return m


def circulant_apply(K: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """``y[..., i, d] = sum_j h[(i - j) mod N, d] v[..., j, d]``, ``h = irfft(K)``, the
    circulant built column by column with ``roll`` (its lower triangle when causal)."""
    N = v.shape[-2]
    h = torch.fft.irfft(K, n=N, dim=-2)                            # (H|1, N, D)
    C = torch.stack([torch.roll(h, j, dims=-2) for j in range(N)], dim=-1)  # (H|1, N, D, N)
    if causal:
        C = C * torch.ones(N, N, dtype=torch.bool).tril()[:, None, :]
    return torch.einsum("hidj,bhjd->bhid", C, v)


# ================================================================ FNet
@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 24), D=st.integers(1, 12),
       seed=st.integers(0, 2**16))
def test_fnet_is_the_real_part_of_the_2d_dft(B, H, N, D, seed):
    v = rand(B, H, N, D, seed=seed)
    out = attnlab.create("fnet")(v, v, v)
    torch.testing.assert_close(out, torch.fft.fft2(v).real, **TIGHT)
    torch.testing.assert_close(out, (dft(N) @ v.to(torch.complex128) @ dft(D)).real, **TIGHT)
    torch.testing.assert_close(fnet_reference(v, v, v, mech=None, scale=None, is_causal=False),
                               out, **TIGHT)


def test_fnet_has_no_parameters_and_ignores_q_and_k():
    m = attnlab.create("fnet")
    assert list(m.parameters()) == [] and not m.spec.learnable
    q, k = (rand(2, 2, 6, 4, seed=i).requires_grad_() for i in (1, 2))
    v = rand(2, 2, 6, 4, seed=3).requires_grad_()
    out = m(q, k, v)
    assert torch.equal(out, m(rand(2, 2, 6, 4, seed=4), rand(2, 2, 6, 4, seed=5), v))
    g = rand(*out.shape, seed=6)
    out.backward(g)
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(k.grad, torch.zeros_like(k))
    # Re(F v F) is self-adjoint (F = F^T): the gradient is the same transform of g.
    torch.testing.assert_close(v.grad, m(g, g, g), **TIGHT)


def test_fnet_scale_multiplies_the_transform():
    m = attnlab.create("fnet")
    v = rand(1, 2, 5, 3, seed=7)
    torch.testing.assert_close(m(v, v, v, scale=1 / math.sqrt(15)), m(v, v, v) / math.sqrt(15),
                               **TIGHT)


def test_fnet_in_a_one_head_layer_with_identity_projections_is_the_papers_sublayer():
    E = 8
    layer = MultiheadAttention(E, 1, "fnet", bias=False, dtype=torch.float64)
    with torch.no_grad():
        for lin in (layer.v_proj, layer.out_proj):
            lin.weight.copy_(torch.eye(E))
    x = rand(2, 10, E, seed=8)
    out = layer(x)
    torch.testing.assert_close(out, torch.fft.fft2(x).real, **TIGHT)  # over (N, E)
    out.square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())  # q_proj, k_proj: zeros
    assert (layer.q_proj.weight.grad == 0).all()


def test_fnet_half_precision_is_transformed_in_float32():
    v = rand(1, 2, 16, 8, seed=9, dtype=torch.float32).half()
    out = attnlab.create("fnet")(v, v, v)
    assert out.dtype == torch.float16
    ref = torch.fft.fft2(v.double()).real
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 2e-3


# ================================================================ global filter
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N", [8, 5, 13])  # = max_seq_len, and resampled to other lengths
def test_an_all_ones_filter_is_the_identity(N, causal):
    m = gfilter(L=8)
    with torch.no_grad():
        m.complex_weight.zero_()
        m.complex_weight[..., 0] = 1.0
    v = rand(2, 2, N, 3, seed=10)
    torch.testing.assert_close(m(v, v, v, is_causal=causal), v, **TIGHT)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 20), D=st.integers(1, 4),
       per_head=st.booleans(), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_global_filter_is_a_circular_convolution_with_irfft_of_the_filter(
        B, H, N, D, per_head, causal, seed):
    m = gfilter(D, H, N, seed=seed, per_head=per_head)
    v = rand(B, H, N, D, seed=seed + 2)
    out = m(v, v, v, is_causal=causal)
    K = torch.view_as_complex(m.complex_weight.detach())
    torch.testing.assert_close(out, circulant_apply(K, v, causal), **TIGHT)
    ref = global_filter_reference(v, v, v, mech=m, scale=None, is_causal=causal)
    torch.testing.assert_close(out, ref, **TIGHT)


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 20), shift=st.integers(-25, 25), seed=st.integers(0, 2**16))
def test_a_circular_shift_of_the_input_shifts_the_output(N, shift, seed):
    m = gfilter(L=N, seed=seed)
    v = rand(2, 2, N, 3, seed=seed + 3)
    out = m(v, v, v)
    moved = torch.roll(v, shift, dims=2)
    torch.testing.assert_close(m(moved, moved, moved), torch.roll(out, shift, dims=2), **TIGHT)


@pytest.mark.parametrize("delay", [1, 3, 7])
def test_the_causal_form_commutes_with_delays_and_never_looks_ahead(delay):
    """Causal linear convolution is time-invariant: inputs delayed by ``s`` (zeros first)
    give outputs delayed by ``s``; and no row sees a later token."""
    m = gfilter(L=12, seed=11)
    v = rand(2, 2, 12, 3, seed=12)
    out = m(v, v, v, is_causal=True)
    late = torch.cat([torch.zeros(2, 2, delay, 3, dtype=torch.float64), v[:, :, :-delay]], 2)
    torch.testing.assert_close(m(late, late, late, is_causal=True)[:, :, delay:],
                               out[:, :, :-delay], **TIGHT)
    changed = v.clone()
    changed[:, :, delay + 1:] = rand(2, 2, 11 - delay, 3, seed=13) * 10
    torch.testing.assert_close(m(changed, changed, changed, is_causal=True)[:, :, :delay + 1],
                               out[:, :, :delay + 1], **TIGHT)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_reach_the_filter(causal):
    m = gfilter(D=2, H=2, L=6, seed=14)
    v = rand(1, 2, 6, 2, seed=15).requires_grad_()
    w = m.complex_weight.detach().clone().requires_grad_()

    def f(v, w):
        return functional_call(m, {"complex_weight": w}, (v, v, v), dict(is_causal=causal))

    assert torch.autograd.gradcheck(f, (v, w))
    q = rand(1, 2, 6, 2, seed=16).requires_grad_()
    m(q, q, v, is_causal=causal).square().sum().backward()
    g = m.complex_weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0
    assert torch.equal(q.grad, torch.zeros_like(q))


# ---------------------------------------------------------------- other lengths
@pytest.mark.parametrize("L,N", [(8, 5), (8, 20), (9, 4), (7, 16), (1, 6), (16, 1)])
def test_other_lengths_resample_the_filter_as_the_reference(L, N):
    m = gfilter(L=L, seed=17)
    v = rand(2, 2, N, 3, seed=18)
    for causal in (False, True):
        ref = global_filter_reference(v, v, v, mech=m, scale=None, is_causal=causal)
        torch.testing.assert_close(m(v, v, v, is_causal=causal), ref, **TIGHT)


@pytest.mark.parametrize("N", [3, 8, 10, 33])
def test_resampling_keeps_the_frequency_response(N):
    """A response linear in frequency (f / L cycles per token at bin f of length L) is
    reproduced at every bin of length N; at N = L the filter is unchanged."""
    L = 16
    w = torch.zeros(1, L // 2 + 1, 2, 2, dtype=torch.float64)
    w[..., 0] = (torch.arange(L // 2 + 1, dtype=torch.float64) / L)[:, None]
    w[..., 1] = 3.0
    got = resample_filter(w, L, N)
    assert got.shape == (1, N // 2 + 1, 2, 2)
    want = torch.arange(N // 2 + 1, dtype=torch.float64) / N
    torch.testing.assert_close(got[..., 0], want[None, :, None].expand(1, N // 2 + 1, 2), **TIGHT)
    assert (got[..., 1] == 3.0).all()
    assert torch.equal(resample_filter(w, L, L), w)


def test_without_interpolation_other_lengths_are_refused():
    m = gfilter(L=8, interpolate=False)
    v = rand(1, 2, 8, 3)
    assert m(v, v, v).shape == v.shape
    with pytest.raises(ValueError, match=r"global_filter: sequence length N=5 differs from "
                                         r"max_seq_len=8, .* and interpolate=False"):
        m(v[:, :, :5], v[:, :, :5], v[:, :, :5])


# ---------------------------------------------------------------- construction and errors
def test_initialisation_and_sharing():
    m = attnlab.create("global_filter", head_dim=64, num_heads=4, max_seq_len=255)
    assert m.complex_weight.shape == (4, 128, 64, 2)
    assert 0.019 < float(m.complex_weight.detach().std()) < 0.021
    shared = gfilter(H=1, per_head=False)
    assert shared.complex_weight.shape[0] == 1
    v = rand(2, 5, 8, 3, seed=19)  # any number of heads, one filter bank
    K = torch.view_as_complex(shared.complex_weight.detach())
    torch.testing.assert_close(shared(v, v, v), circulant_apply(K, v, False), **TIGHT)


@pytest.mark.parametrize("hp,exc,match", [
    ({"num_heads": 2, "max_seq_len": 8}, ValueError, r"'head_dim' is required"),
    ({"head_dim": 0, "num_heads": 2, "max_seq_len": 8}, ValueError, r"'head_dim' must be >= 1"),
    ({"head_dim": 4, "num_heads": 2, "max_seq_len": 0}, ValueError,
     r"'max_seq_len' must be >= 1; got 0"),
    ({"head_dim": 4, "max_seq_len": 8}, ValueError, r"'num_heads' is required"),
    ({"head_dim": 4, "num_heads": 2, "max_seq_len": 8, "per_head": "no"}, TypeError,
     r"'per_head' must be a bool; got str 'no'"),
    ({"head_dim": 4, "num_heads": 2, "max_seq_len": 8, "interpolate": 1}, TypeError,
     r"'interpolate' must be a bool; got int 1"),
])
def test_bad_hparams(hp, exc, match):
    with pytest.raises(exc, match=match):
        attnlab.create("global_filter", **hp)


def test_bad_shapes_name_the_dimension():
    m = gfilter(D=3, H=2)
    v = rand(1, 2, 8, 3)
    with pytest.raises(ValueError, match=r"global_filter: v head dim 4 does not match head_dim=3"):
        m(v, v, rand(1, 2, 8, 4))
    with pytest.raises(ValueError, match=r"num_heads=2 \(a filter bank per head\) does not "
                                         r"match the H=3 heads of v"):
        w = rand(1, 3, 8, 3)
        m(w, w, w)


@pytest.mark.parametrize("name", ["fnet", "global_filter"])
def test_what_they_refuse(name):
    m = gfilter() if name == "global_filter" else attnlab.create("fnet")
    v = rand(1, 2, 8, 3)
    if name == "fnet":
        with pytest.raises(ValueError, match=r"fnet has no causal form"):
            m(v, v, v, is_causal=True)
    for mask in (torch.ones(8, 8, dtype=torch.bool), torch.ones(1, 1, 1, 8, dtype=torch.bool)):
        with pytest.raises(ValueError, match=rf"{name} cannot take an arbitrary attn_mask"):
            m(v, v, v, attn_mask=mask)
    with pytest.raises(ValueError, match=rf"{name} cannot return attention weights"):
        m(v, v, v, need_weights=True)
    with pytest.raises(ValueError, match=rf"{name} needs Nq == Nk"):
        m(v[:, :, :4], v, v)
    with pytest.raises(ValueError, match=rf"{name}: dropout_p=0.1 is not supported"):
        m(v, v, v, dropout_p=0.1)


def test_neither_is_a_v_for_an_attention_matrix_a():
    """Why ``effective_weights`` is False: no (N, N) matrix A gives out = A v. FNet moves a
    single nonzero column of v into the others; the filter treats equal columns apart."""
    v = torch.zeros(1, 1, 6, 3, dtype=torch.float64)
    v[..., 0] = rand(6, seed=20)
    out = attnlab.create("fnet")(v, v, v)
    assert out[..., 1:].abs().max() > 1e-3  # A v would keep columns 1, 2 at zero
    m = gfilter(D=3, H=1, L=6, seed=21)
    same = rand(1, 1, 6, 1, seed=22).expand(1, 1, 6, 3)
    y = m(same, same, same)
    assert (y[..., 0] - y[..., 1]).abs().max() > 1e-3  # A v would give equal columns
    assert not attnlab.get("fnet").cls.effective_weights
    assert not attnlab.get("global_filter").cls.effective_weights


@pytest.mark.parametrize("name,causal", [("fnet", False), ("global_filter", False),
                                         ("global_filter", True)])
def test_the_correctness_gate_passes(name, causal):
    for dtype in (torch.float32, torch.float64):
        r = verify(name, causal=causal, dtype=dtype)
        assert r.ok, r
