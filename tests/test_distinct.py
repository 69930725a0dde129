"""Every mechanism in the registry is its own: no two give the same output on the same
random inputs, unless both compute exact softmax attention (the exact family: different
implementations of one function, which the correctness gate checks against one reference)
or the pair is listed in :data:`SAME` with the reason.

Each mechanism is built as the generic tests build it (its ``tiny_hparams``, parameters
drawn under one seed), in eval mode, and called non-causally (every mechanism has that
form) on the same seeded ``q, k, v`` (B = 2, H = 2, N = 64, D = 8). Two outputs are
"the same" when they agree to 1e-5 of their size. A new mechanism that is secretly another
one under a new name (plain multi-head attention, say) fails here.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import attnlab
from tests.conftest import build

N, D, H, B = 64, 8, 2, 2

# Pairs that agree on these inputs by design, with the reason (a limit case at N = 64).
SAME: dict[frozenset, str] = {
    frozenset(("block_sparse", "local")): "block_sparse without a layout is local: its default "
                                          "layout is the block diagonal (what it adds is any "
                                          "other layout, set_layout)",
    frozenset(("luong_monotonic", "sliding_window")): "Luong's local-m with Nq = Nk aligns "
                                                      "p_t = t: a band of 2D + 1 keys, a "
                                                      "sliding window; its own case is "
                                                      "cross-attention (align='scaled')",
}


def _softmax_attention(name: str) -> bool:
    """Whether the mechanism's own definition is softmax(q k^T / sqrt(D)) V exactly."""
    spec = attnlab.get(name)
    return spec.exact and spec.limit is not None and spec.limit.reference is None


def _outputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    out = {}
    for name in attnlab.list_mechanisms():
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(1)
            mech = build(name, head_dim=D, num_heads=H).eval()
            if hasattr(mech, "remember"):  # a memory of past keys: give it some first
                mech.remember(torch.randn(B, H, N, D, generator=gen),
                              torch.randn(B, H, N, D, generator=gen))
            out[name] = mech(q, k, v)
    return out


@pytest.fixture(scope="module")
def outputs():
    return _outputs()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    size = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    return float((a - b).abs().max()) <= 1e-5 * size


def test_no_two_mechanisms_are_the_same_unless_documented(outputs):
    clashes = []
    for a, b in itertools.combinations(sorted(outputs), 2):
        if not _same(outputs[a], outputs[b]):
            continue
        if _softmax_attention(a) and _softmax_attention(b):
            continue
        if frozenset((a, b)) in SAME:
            continue
        clashes.append((a, b))
    assert not clashes, f"mechanisms with the same output, not documented as such: {clashes}"


def test_the_documented_pairs_still_agree(outputs):
    # a stale entry would hide nothing, but it would document something false
    for pair, why in SAME.items():
        a, b = sorted(pair)
        assert _same(outputs[a], outputs[b]), f"{a} and {b} no longer agree ({why})"


def test_the_check_sees_a_renamed_mechanism(outputs):
    """The comparison does catch a copy: sdpa against itself, and a scaled copy does not
    pass as the same."""
    s = outputs["sdpa"]
    assert _same(s, s.clone())
    assert not _same(s, s * (1 + 1e-3))
