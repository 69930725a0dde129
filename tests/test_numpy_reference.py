"""The NumPy walk-through is documentation that runs: its doctests pass and it agrees
with attnlab's ``reference`` mechanism and with PyTorch's SDPA."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab import numpy_reference
from attnlab.numpy_reference import scaled_dot_product_attention, softmax, tutorial_example

# The figure printed by the tutorial this module reproduces (first output row).
PUBLISHED_FIRST_ROW = [0.98522025, 1.74174051, 0.75652026]


def test_doctests_pass():
    result = doctest.testmod(numpy_reference, verbose=False)
    assert result.attempted > 10
    assert result.failed == 0


def test_tutorial_example_matches_published_figure():
    out = tutorial_example()
    assert out.shape == (4, 3)
    np.testing.assert_allclose(out[0], PUBLISHED_FIRST_ROW, rtol=0, atol=5e-9)


def test_softmax_is_stable_and_normalised():
    x = np.array([[1e4, 1e4 - 1.0, -1e4], [0.0, 0.0, 0.0]])
    p = softmax(x, axis=-1)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=1e-15)
    np.testing.assert_allclose(p[1], [1 / 3] * 3)
    np.testing.assert_allclose(softmax(x, axis=0).sum(axis=0), 1.0)


def _inputs(seed, B=2, H=3, Nq=5, Nk=7, D=4, Dv=6):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, H, Nq, D)), rng.standard_normal((B, H, Nk, D)),
            rng.standard_normal((B, H, Nk, Dv)))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("with_mask", [False, True])
def test_matches_reference_and_sdpa(seed, with_mask):
    Q, K, V = _inputs(seed)
    mask = None
    if with_mask:
        mask = np.random.default_rng(100 + seed).random((2, 1, 5, 7)) < 0.6
        mask[0, 0, 1, :] = False  # one fully masked row: zeros everywhere
    got = scaled_dot_product_attention(Q, K, V, mask=mask)
    assert got.shape == (2, 3, 5, 6)

    q, k, v = (torch.from_numpy(a) for a in (Q, K, V))
    tmask = None if mask is None else torch.from_numpy(mask)
    ref = attnlab.create("reference")(q, k, v, attn_mask=tmask).numpy()
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=tmask).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got, sdpa, rtol=0, atol=1e-10)
    if with_mask:
        assert (got[0, :, 1, :] == 0).all()


def test_causal_mask_and_unbatched_inputs():
    Q, K, V = (a[0, 0] for a in _inputs(7, Nq=6, Nk=6))
    causal = np.tril(np.ones((6, 6), dtype=bool))
    got = scaled_dot_product_attention(Q, K, V, mask=causal)
    q, k, v = (torch.from_numpy(a)[None, None] for a in (Q, K, V))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)[0, 0].numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got[0], V[0], atol=1e-15)
