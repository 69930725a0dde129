"""``flash`` under ``is_causal`` skips the tiles the mask removes (issue 17): outputs and
gradients equal a float64 dense reference over odd lengths, ``Nq != Nk``, block sizes and
masks combined with causality; and the skipped tiles are really never read (a NaN placed
only in them cannot reach any output or gradient, while computing them would spread it)."""

from __future__ import annotations

import math

import torch
from conftest import naive_attention_f64
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.mechanisms._engines import flash as engine
from attnlab.mechanisms._engines.flash import FlashAttentionFunction


def dense(q, k, v, mask, scale):
    """Causal softmax attention, top-left aligned (key j allowed iff j <= i), float64."""
    return naive_attention_f64(q, k, v, mask, is_causal=True, scale=scale)


def inputs(seed, B, H, Nq, Nk, D, kind):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64, generator=g).requires_grad_()
               for n in (Nq, Nk, Nk))
    mask = None
    if kind == "bool":
        mask = torch.rand(H, Nq, Nk, generator=g) < 0.7
        mask[..., 0] = True  # every row keeps key 0, which causality always allows
    elif kind == "float":
        mask = torch.randn(1, Nq, Nk, dtype=torch.float64, generator=g).requires_grad_()
    return q, k, v, mask


@settings(max_examples=40, deadline=None)
@given(Nq=st.integers(1, 37), Nk=st.integers(1, 37), bq=st.integers(1, 9),
       bk=st.integers(1, 9), kind=st.sampled_from([None, "bool", "float"]),
       seed=st.integers(0, 2**16))
def test_causal_output_and_gradients_equal_dense_float64(Nq, Nk, bq, bk, kind, seed):
    q, k, v, mask = inputs(seed, 2, 2, Nq, Nk, 5, kind)
    leaves = [q, k, v] + ([mask] if kind == "float" else [])
    out = FlashAttentionFunction.apply(q, k, v, mask, True, 0.4, 0.0, bq, bk)
    ref = dense(q, k, v, mask, 0.4)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(ref)
    got = torch.autograd.grad((out * w).sum(), leaves)
    want = torch.autograd.grad((ref * w).sum(), leaves)
    for a, b, name in zip(got, want, "qkvm", strict=False):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"d{name}")


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 30), bq=st.integers(1, 7), bk=st.integers(1, 7),
       extra=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_skipped_tiles_are_never_read(N, bq, bk, extra, seed):
    """With more keys than queries, keys ``j >= Nq`` follow every causal row. Poisoned with
    NaN, they leave every output and gradient finite only if no tile holding only such keys
    is computed (a computed tile adds ``-inf`` to ``NaN``: still ``NaN``)."""
    q, k, v, _ = inputs(seed, 1, 2, N, N, 3, None)
    first_skipped = -(-N // bk) * bk  # keys from here on lie in tiles no row needs
    pad = first_skipped - N + extra
    fill = torch.zeros(1, 2, pad, 3, dtype=k.dtype)
    fill[:, :, first_skipped - N:] = math.nan
    k2, v2 = (torch.cat([x.detach(), fill], 2).requires_grad_() for x in (k, v))
    q2 = q.detach().requires_grad_()
    out = FlashAttentionFunction.apply(q2, k2, v2, None, True, 0.5, 0.0, bq, bk)
    torch.testing.assert_close(out, dense(q, k, v, None, 0.5), rtol=1e-10, atol=1e-10)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q2, k2, v2))
    assert torch.isfinite(dq).all()
    assert (dk[:, :, N:] == 0).all() and (dv[:, :, N:] == 0).all()


def test_causal_work_is_about_half_of_the_square(monkeypatch):
    """Forward and backward each compute ``T(T+1)/2`` of the ``T^2`` tiles of ``T`` square
    blocks under ``is_causal``."""
    seen = []
    original = engine._Tiles.mask_tile

    def counting(self, S, i0, i1, j0, j1):
        seen.append((i0, j0))
        return original(self, S, i0, i1, j0, j1)

    monkeypatch.setattr(engine._Tiles, "mask_tile", counting)
    T, b = 6, 4
    q, k, v, _ = inputs(0, 1, 1, T * b, T * b, 3, None)
    counts = []
    for causal in (True, False):
        seen.clear()
        FlashAttentionFunction.apply(q, k, v, None, causal, 0.5, 0.0, b, b).sum().backward()
        counts.append(len(seen))
    assert counts == [T * (T + 1), 2 * T * T]
