"""Axial attention (Ho et al. 2019) against its own two-step definition.

The reference here builds the dense ``(N, N)`` "same row" and "same column" masks of the
grid pair by pair, runs plain float64 softmax attention with the first (values ``v``) and
then with the second (values: the row outputs), over random grids, heads, masks, scales and
causal (hypothesis); one row is SDPA. Then the defining properties: no raster future in
the causal form, batch and heads not scrambled, a query reaches only its column, the
values of another column only through the token of its own column, O(N (rows + cols))
memory, the grid rules and their errors, and the inpainting ViT with ``axial``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import LargestTensor, saved_numels
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
import attnlab.mechanisms.axial  # noqa: F401  (registers the family)
from attnlab.mechanisms.axial import axial_reference, most_square_grid
from attnlab.models.vision import ViTInpainter, inpainting_loss
from attnlab.verify import verify

TIGHT = dict(rtol=1e-10, atol=1e-12)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def axial(grid, **hp):
    return attnlab.create("axial", grid=grid, **hp)


# ---------------------------------------------------------------- the independent definition
def two_steps(q, k, v, rows, cols, *, causal=False, mask=None, scale=None):
    """Row attention then column attention, with dense pair-by-pair masks (plain softmax:
    exp / sum, a row with no allowed key is zeros). ``mask``: bool ``(N, N)`` or None."""
    n = rows * cols
    same_row = torch.tensor([[i // cols == j // cols for j in range(n)] for i in range(n)])
    same_col = torch.tensor([[i % cols == j % cols for j in range(n)] for i in range(n)])
    allowed = torch.ones(n, n, dtype=torch.bool) if mask is None else mask
    if causal:
        allowed = allowed & torch.tensor([[j <= i for j in range(n)] for i in range(n)])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q.double() @ k.double().transpose(-2, -1) * scale

    def attend(keys, values):
        e = torch.exp(s - s.amax(-1, keepdim=True)) * keys
        z = e.sum(-1, keepdim=True)
        p = torch.where(z > 0, e / torch.where(z > 0, z, 1.0), 0.0)
        return p @ values, p

    y, p_row = attend(same_row & allowed, v.double())
    out, p_col = attend(same_col & allowed, y)
    return out, p_col @ p_row


def test_the_family_is_registered_with_truthful_flags():
    assert attnlab.list_mechanisms(family="axial") == ["axial"]
    s = attnlab.get("axial")
    assert s.causal and s.arbitrary_mask and s.key_padding and s.returns_weights
    assert not (s.exact or s.learnable or s.cross or s.kv_cache)
    assert "N^2" not in s.memory


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 5), H=st.integers(1, 3),
       causal=st.booleans(), masked=st.booleans(), scale=st.sampled_from([None, 0.3, 1.7]),
       by_cols=st.booleans(), seed=st.integers(0, 2**16))
def test_equals_row_then_column_attention(rows, cols, H, causal, masked, scale, by_cols, seed):
    n = rows * cols
    q, k = rand(2, H, n, 3, seed=seed), rand(2, H, n, 3, seed=seed + 1)
    v = rand(2, H, n, 2, seed=seed + 2)
    mask = (torch.rand(n, n, generator=torch.Generator().manual_seed(seed)) < 0.7
            if masked else None)
    mech = axial(cols if by_cols else (rows, cols))
    out, A = mech(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, need_weights=True)
    want, A_want = two_steps(q, k, v, rows, cols, causal=causal, mask=mask, scale=scale)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(A, A_want, **TIGHT)  # the effective weights: out = A v
    torch.testing.assert_close(A @ v, want, **TIGHT)
    got = axial_reference(q, k, v, mech=mech, scale=scale, is_causal=causal, attn_mask=mask)
    torch.testing.assert_close(got, want, **TIGHT)  # the module's own float64 reference


def test_additive_and_per_batch_masks_act_on_both_steps():
    q, k, v = (rand(2, 2, 12, 4, seed=i) for i in range(3))
    allowed = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(3)) < 0.7
    additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, -torch.inf)
    mech = axial((3, 4))
    out = mech(q, k, v, attn_mask=additive)
    torch.testing.assert_close(mech(q, k, v, attn_mask=allowed), out, **TIGHT)
    for b in range(2):
        want, _ = two_steps(q[b:b + 1], k[b:b + 1], v[b:b + 1], 3, 4, mask=allowed[b, 0])
        torch.testing.assert_close(out[b:b + 1], want, **TIGHT)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, 5] = keep[1, 8:] = False  # key padding: the key is gone from both steps
    pad = keep[:, None, None, :]
    for b in range(2):
        want, _ = two_steps(q[b:b + 1], k[b:b + 1], v[b:b + 1], 3, 4,
                            mask=keep[b][None, :].expand(12, 12))
        torch.testing.assert_close(mech(q, k, v, attn_mask=pad)[b:b + 1], want, **TIGHT)


@pytest.mark.parametrize("causal", [False, True])
def test_one_row_or_one_column_is_exact_attention(causal):
    q, k, v = (rand(2, 3, 10, 4, seed=i) for i in range(3))
    mask = torch.rand(10, 10, generator=torch.Generator().manual_seed(0)) < 0.8
    mask.fill_diagonal_(True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask & torch.ones(
        10, 10, dtype=torch.bool).tril() if causal else mask)
    for grid in ((1, 10), (10, 1)):
        torch.testing.assert_close(axial(grid)(q, k, v, is_causal=causal), want, **TIGHT)
        torch.testing.assert_close(axial(grid)(q, k, v, attn_mask=mask, is_causal=causal),
                                   masked, **TIGHT)


# ---------------------------------------------------------------- causal
def test_causal_never_reads_the_raster_future():
    rows, cols = 4, 5
    n = rows * cols
    mech = axial((rows, cols))
    q, k, v = (rand(1, 2, n, 3, seed=i).requires_grad_() for i in range(3))
    out = mech(q, k, v, is_causal=True)
    for i in range(n):
        grads = torch.autograd.grad(out[..., i, :].sum(), (q, k, v), retain_graph=True)
        for g in grads:  # no input at a raster position after i reaches output i
            assert (g[..., i + 1:, :] == 0).all(), i
        # what it does read: (r', c') with r' <= r, c' <= c (the sub-grid up and left)
        r, c = divmod(i, cols)
        reached = grads[2].abs().sum((0, 1, 3)) > 0
        assert reached.tolist() == [j // cols <= r and j % cols <= c for j in range(n)]
    # a perturbation of every future token changes no past output
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[..., 11:, :] = 100 * rand(1, 2, n - 11, 3, seed=9)
    torch.testing.assert_close(mech(q2, k2, v2, is_causal=True)[..., :11, :],
                               out[..., :11, :].detach(), rtol=0, atol=0)


# ---------------------------------------------------------------- nothing scrambled
def test_batch_and_heads_are_not_scrambled():
    mech = axial((3, 4))
    q, k, v = (rand(3, 4, 12, 5, seed=i) for i in range(3))
    out = mech(q, k, v)
    pb, ph = torch.tensor([2, 0, 1]), torch.tensor([3, 1, 0, 2])
    perm = mech(*(t[pb][:, ph] for t in (q, k, v)))
    torch.testing.assert_close(perm, out[pb][:, ph], rtol=0, atol=1e-14)


def test_a_query_reaches_only_its_column_and_other_columns_through_it():
    rows, cols = 3, 4
    n = rows * cols
    mech = axial((rows, cols))
    q, k, v = (rand(1, 1, n, 3, seed=i).requires_grad_() for i in range(3))
    out, A = mech(q, k, v, need_weights=True)
    for i in range(n):
        gq, = torch.autograd.grad(out[..., i, :].sum(), q, retain_graph=True)
        reached = gq.abs().sum((0, 1, 3)) > 0
        assert reached.tolist() == [j % cols == i % cols for j in range(n)]  # its column
    # v at (s, t) reaches (r, c) only through the token (s, c): row s of A[(r, c)] is
    # C[(r, c), (s, c)] times the row weights of the query (s, c) over row s.
    qd, kd = q.detach(), k.detach()
    for s in range(rows):
        row = slice(s * cols, (s + 1) * cols)
        R_s = torch.softmax(qd[0, 0, row] @ kd[0, 0, row].T * 3 ** -0.5, dim=-1)
        for i in range(n):
            a = A[0, 0, i, row]
            torch.testing.assert_close(a, a.sum() * R_s[i % cols], **TIGHT)
            assert a.sum() > 0


# ---------------------------------------------------------------- the grid
def test_grid_rules():
    g = axial(None, max_seq_len=64)
    assert g.grid_for(64) == (8, 8) and g.grid_for(16) == (2, 8)  # the width sqrt(64)
    g = axial(None, max_seq_len=32)  # not a square: the most square grid of each N
    assert g.grid_for(32) == (4, 8) and g.grid_for(7) == (1, 7) and g.grid_for(36) == (6, 6)
    assert axial(None).grid_for(12) == (3, 4)
    assert axial(4).grid_for(20) == (5, 4) and axial((2, 6)).grid_for(12) == (2, 6)
    assert axial([2, 6]).hp["grid"] == (2, 6)  # a JSON list is a grid too
    for n in range(1, 60):
        r, c = most_square_grid(n)
        assert r * c == n and r <= c and all(n % d or d < c for d in range(r + 1, c))
    mech = attnlab.create_for("axial", head_dim=4, num_heads=2, max_seq_len=36)
    assert mech.hp["max_seq_len"] == 36 and mech.grid_for(36) == (6, 6)


@pytest.mark.parametrize("grid,exc,pattern", [
    ((0, 4), ValueError, r"'grid' sizes must be >= 1; got \(0, 4\)"),
    (-2, ValueError, r"'grid' sizes must be >= 1; got -2"),
    ("4x4", TypeError, r"'grid' must be \(rows, cols\), an int cols or None; got str '4x4'"),
    ((4, 4, 1), TypeError, r"must be \(rows, cols\), an int cols or None; got tuple"),
    ((4.0, 4), TypeError, r"must be \(rows, cols\), an int cols or None; got tuple"),
    (True, TypeError, r"must be \(rows, cols\), an int cols or None; got bool True"),
])
def test_bad_grids_are_refused_at_construction(grid, exc, pattern):
    with pytest.raises(exc, match=pattern):
        axial(grid)


def test_grids_that_do_not_fit_the_call_are_refused():
    x = rand(1, 1, 16, 4)
    with pytest.raises(ValueError, match=r"axial: grid \(3, 5\) has 15 cells but the sequence "
                                         r"has N=16 tokens"):
        axial((3, 5))(x, x, x)
    with pytest.raises(ValueError, match=r"axial: N=16 tokens are not whole rows of cols=5; "):
        axial(5)(x, x, x)
    with pytest.raises(ValueError, match=r"not whole rows of cols=8 \(grid=None: the width "
                                         r"sqrt\(max_seq_len=64\)\)"):
        axial(None, max_seq_len=64)(x[..., :12, :], x[..., :12, :], x[..., :12, :])
    with pytest.raises(ValueError, match=r"axial needs Nq == Nk"):
        axial(4)(x[..., :4, :], x, x)


# ---------------------------------------------------------------- cost
def test_memory_is_n_times_rows_plus_cols():
    rows, cols = 24, 40
    n = rows * cols
    q, k, v = (torch.randn(1, 2, n, 4, requires_grad=True) for _ in range(3))
    with LargestTensor() as mode, saved_numels() as saved:
        axial((rows, cols))(q, k, v).sum().backward()
    # B H N max(rows, cols): one step's scores; (B, H, N, N) would be 2 n^2
    assert mode.largest <= 2 * n * max(rows, cols) < n * n / 8, mode.largest
    assert max(saved) <= 2 * n * max(rows, cols), max(saved)


def test_the_gate_and_half_precision():
    for causal in (False, True):
        assert verify("axial", causal=causal, n=30).ok
        assert verify("axial", causal=causal, dtype=torch.float64, n=7).ok
    q, k, v = (rand(2, 2, 16, 8, seed=i).to(torch.bfloat16) for i in range(3))
    out = axial(4)(q, k, v)
    want, _ = two_steps(q, k, v, 4, 4)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want, rtol=4e-2, atol=4e-2)


# ---------------------------------------------------------------- the inpainting ViT
def test_vit_inpainter_fills_the_grid_and_trains_a_step():
    torch.manual_seed(0)
    net = ViTInpainter(8, 2, mechanism="axial", d_model=16, num_heads=2, num_layers=2)
    assert all(b.attn.attn.hp["grid"] == (4, 4) for b in net.blocks)
    assert net.config["mechanism_kwargs"] == {}  # derived, not part of the config
    x = torch.rand(3, 1, 8, 8)
    m = torch.rand(3, 1, 8, 8) < 0.4
    pred = net(x, m)
    assert pred.shape == x.shape and torch.isfinite(pred).all()
    inpainting_loss(pred, x, m).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    maps = net.attention_maps(x, m)
    assert len(maps) == 2 and maps[0].shape == (3, 2, 16, 16)
    wide = ViTInpainter(8, 2, mechanism="axial", mechanism_kwargs={"grid": [2, 8]},
                        d_model=16, num_heads=2, num_layers=1)
    assert wide.blocks[0].attn.attn.hp["grid"] == (2, 8)  # given: kept


def test_the_inpainting_task_trains_with_axial(tmp_path, one_thread):
    pytest.importorskip("sklearn")
    from attnlab.tasks import get_task
    from attnlab.train.loop import train

    cfg = get_task("inpaint_digits").make_config(
        max_steps=2, eval_every=1, warmup_steps=1, batch_size=8, mechanism="axial",
        model_kwargs={"d_model": 16, "num_heads": 2, "num_layers": 1},
        task_kwargs={"n_train": 32}, eval_batches=1)
    r = train(cfg, tmp_path / "axial", progress=False)
    rows = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(torch.isfinite(torch.tensor(row["train_loss"])) for row in rows)
    assert "psnr" in r.test
