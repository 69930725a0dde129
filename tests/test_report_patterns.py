"""attnlab.report.patterns: sparsity patterns and attention figures.

The two ways of reading a pattern (the mechanism's own predicate, and the empirical run
on q = k = 0, v = I) are compared with each other and with the paper's pattern written
pair by pair in tests/test_sparse.py; densities with hand counts; figures by their files.
"""

from __future__ import annotations

import html
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sparse import NAMES, dense_allowed, hparams_for

import attnlab
from attnlab.report.patterns import (
    empirical_pattern,
    plot_attention,
    plot_patterns,
    predicate_pattern,
    sparsity_pattern,
    structured_mechanisms,
)

pytest.importorskip("matplotlib")


# ------------------------------------------------------------------ patterns
@settings(max_examples=30)
@given(data=st.data(), name=st.sampled_from(NAMES), n=st.integers(1, 24), causal=st.booleans())
def test_empirical_and_predicate_patterns_equal_the_papers_pattern(data, name, n, causal):
    hp = hparams_for(name, data, n)
    mech = attnlab.create(name, **hp)
    expected = dense_allowed(name, mech, n, causal)
    assert torch.equal(predicate_pattern(mech, n, causal), expected)
    assert torch.equal(empirical_pattern(mech, n, causal), expected)
    got = sparsity_pattern(name, n, causal=causal, **hp)
    assert got.dtype == torch.bool and got.shape == (n, n)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["sdpa", "reference", "flash"])
@pytest.mark.parametrize("n", [1, 7, 20])
def test_exact_mechanisms_give_full_or_causal_tril(name, n):
    assert torch.equal(sparsity_pattern(name, n, causal=True),
                       torch.ones(n, n, dtype=torch.bool).tril())
    assert torch.equal(sparsity_pattern(name, n), torch.ones(n, n, dtype=torch.bool))


def test_structured_set_is_sparse_family_plus_exact_softmax():
    names = structured_mechanisms()
    assert set(NAMES) <= set(names) and "sdpa" in names
    assert not {"performer", "linformer", "reformer", "nystromformer"} & set(names)


def test_densities_match_hand_counts():
    # local, b = 4, n = 10: blocks of 4, 4, 2 tokens -> 16 + 16 + 4 = 36 pairs.
    assert sparsity_pattern("local", 10, block_size=4).sum().item() == 36
    # causal local: 10 + 10 + 3 = 23 pairs.
    assert sparsity_pattern("local", 10, causal=True, block_size=4).sum().item() == 23
    # sliding_window w = 4, n = 6: |i - j| <= 2 -> rows of 3, 4, 5, 5, 4, 3 = 24 of 36.
    p = sparsity_pattern("sliding_window", 6, window=4, block_size=4)
    assert p.sum(1).tolist() == [3, 4, 5, 5, 4, 3]
    assert p.float().mean().item() == pytest.approx(24 / 36)
    # causal, w = 3, n = 5: i - 3 < j <= i -> rows of 1, 2, 3, 3, 3 = 12 of 25.
    p = sparsity_pattern("swa", 5, causal=True, window=3, block_size=2)  # an alias
    assert p.sum(1).tolist() == [1, 2, 3, 3, 3]


def test_method_choice_and_errors():
    kw = dict(window=3, block_size=2)
    a = sparsity_pattern("longformer", 9, method="predicate", **kw)
    assert torch.equal(a, sparsity_pattern("longformer", 9, method="empirical", **kw))
    with pytest.raises(ValueError, match=r"unknown name 'sliding_windw'.*'sliding_window'"):
        sparsity_pattern("sliding_windw", 8)
    with pytest.raises(ValueError, match=r"'performer' \(kernel family\) has no fixed"):
        sparsity_pattern("performer", 8, head_dim=4)
    with pytest.raises(ValueError, match="method 'predicate' needs a sparse-family"):
        sparsity_pattern("sdpa", 8, method="predicate")
    with pytest.raises(ValueError, match=r"method must be one of .*; got 'exact'"):
        sparsity_pattern("sdpa", 8, method="exact")
    with pytest.raises(ValueError, match="n must be an int >= 1; got int 0"):
        sparsity_pattern("local", 0)
    with pytest.raises(TypeError, match="unknown hyperparameter 'windw'"):
        sparsity_pattern("sliding_window", 8, windw=3)


# ------------------------------------------------------------------ figures
def _check_files(paths, *texts):
    assert [p.suffix for p in paths] == [".png", ".svg"]
    png, svg = paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Rendered text only (SVG text stays <text>; comments also hold the raw strings).
    shown = set(re.findall(r"<text[^>]*>([^<]*)</text>", svg.read_text()))
    for t in texts:
        assert html.escape(t, quote=False) in shown, (t, shown)


def test_plot_patterns_writes_png_and_svg_with_densities(tmp_path):
    pats = {"local": sparsity_pattern("local", 8, block_size=4),           # 32/64
            "sdpa causal": sparsity_pattern("sdpa", 8, causal=True)}      # 36/64
    paths = plot_patterns(pats, tmp_path / "sub" / "patterns.png")
    assert paths[0] == tmp_path / "sub" / "patterns.png"
    _check_files(paths, "local", "density 50.0%", "sdpa causal", "density 56.2%")


def test_plot_attention_writes_heads_mean_tokens_and_title(tmp_path):
    tokens = ["[CLS]", "the", "movie", "costs", "$5$", "great"]
    w = torch.softmax(torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(0)), -1)
    paths = plot_attention(tokens, w, tmp_path / "attn", title="Layer 0 attention")
    _check_files(paths, "Layer 0 attention", "head 0", "head 1", "mean of heads",
                 "[CLS]", "movie", "$5$")


def test_plot_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="patterns must be a non-empty dict"):
        plot_patterns({}, tmp_path / "x")
    with pytest.raises(ValueError, match=r"pattern 'a' must be 2-D .*got shape \(3,\)"):
        plot_patterns({"a": torch.ones(3)}, tmp_path / "x")
    with pytest.raises(ValueError, match=r"weights must be \(H, N, N\); got shape \(4, 4\)"):
        plot_attention(list("abcd"), torch.ones(4, 4), tmp_path / "x", title="t")
    with pytest.raises(ValueError, match="tokens must have N=4 entries .*got 3"):
        plot_attention(list("abc"), torch.ones(1, 4, 4), tmp_path / "x", title="t")
