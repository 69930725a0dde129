"""The sparse family: each pattern equals exact attention under its dense mask.

The dense mask is built here, pair by pair, from the papers' definitions (pure Python, no
attnlab code), and compared with ``naive_attention_f64`` on random shapes: the blocked
path in outputs and gradients, the FlexAttention path in outputs (it has no CPU
backward). Then limit cases, causality, memory (no ``N x N`` tensor) and errors.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from conftest import LargestTensor, naive_attention_f64, saved_numels
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.mechanisms._engines import blocksparse

NAMES = ["local", "sliding_window", "dilated_window", "longformer", "bigbird",
         "sparse_transformer", "block_sparse"]


def test_the_family_is_registered():
    assert attnlab.list_mechanisms(family="sparse") == sorted(NAMES)


# ---------------------------------------------------------------- the independent definition
def dense_allowed(name, mech, n, causal):
    """(n, n) bool: which pairs the paper's pattern allows, written pair by pair."""
    hp = mech.hp
    b = hp["block_size"]
    if name == "bigbird":
        R = mech.random_blocks(n).tolist()
    if name == "block_sparse":
        A = hp["layout"].tolist() if hp["layout"] is not None else None
    G = {g % n for g in ((0,) if hp.get("global_tokens") is None else hp["global_tokens"])}

    def ok(i, j):
        if name == "local":
            return i // b == j // b
        if name == "sliding_window":
            w = hp["window"]
            return i - w < j <= i if causal else abs(i - j) <= w // 2
        if name == "dilated_window":
            w, d = hp["window"], hp["dilation"]
            if (j - i) % d:
                return False
            t = (j - i) // d
            return -w < t <= 0 if causal else abs(t) <= w // 2
        if name in ("longformer", "bigbird"):
            base = abs(i - j) <= hp["window"] // 2 or i in G or j in G
            return base or (name == "bigbird" and R[i // b][j // b])
        if name == "sparse_transformer":
            l = hp["stride"]
            if l is None:  # documented default: the multiple of b nearest sqrt(n), >= b, c
                l = max(b * round(n ** 0.5 / b), b, hp["c"])
            if hp["pattern"] == "strided":
                return abs(i - j) <= l or (i - j) % l == 0
            return i // l == j // l or j % l >= l - hp["c"]
        if name == "block_sparse":
            return i // b == j // b if A is None else A[i // b][j // b]
        raise AssertionError(name)

    return torch.tensor([[ok(i, j) and (not causal or j <= i) for j in range(n)]
                         for i in range(n)], dtype=torch.bool)


def hparams_for(name, data, n):
    """Random valid hyperparameters (small blocks so that N spans several)."""
    hp = {"block_size": data.draw(st.integers(1, 9), label="block_size")}
    if name in ("sliding_window", "dilated_window", "longformer", "bigbird"):
        hp["window"] = data.draw(st.integers(1, 12), label="window")
    if name == "dilated_window":
        hp["dilation"] = data.draw(st.integers(1, 4), label="dilation")
    if name in ("longformer", "bigbird"):
        hp["global_tokens"] = tuple(data.draw(st.lists(st.integers(-n, n - 1), max_size=3),
                                              label="global_tokens"))
    if name == "bigbird":
        hp["num_random_blocks"] = data.draw(st.integers(0, 3), label="r")
        hp["seed"] = data.draw(st.integers(0, 100), label="seed")
    if name == "sparse_transformer":
        hp["pattern"] = data.draw(st.sampled_from(["strided", "fixed"]), label="pattern")
        hp["stride"] = data.draw(st.one_of(st.none(), st.integers(1, 10)), label="stride")
        hp["c"] = data.draw(st.integers(1, hp["stride"] or 10), label="c")
    if name == "block_sparse":
        nb = -(-n // hp["block_size"]) + data.draw(st.integers(0, 2), label="extra blocks")
        seed = data.draw(st.integers(0, 1000), label="layout seed")
        hp["layout"] = torch.rand(nb, nb, generator=torch.Generator().manual_seed(seed)) < 0.4
    return hp


def user_mask(kind, B, n, seed):
    """None, a bool (B, 1, n, n) mask, or a float (n, n) mask with -inf; one dead row each."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, 1, n, n, generator=g) < 0.7
    keep[0, 0, n // 2] = False  # a row the mask blocks entirely
    if kind == "bool":
        return keep
    return torch.randn(n, n, generator=g, dtype=torch.float64).masked_fill(~keep[0, 0], -torch.inf)


def combined(pattern, mask):
    """The pattern as the reference's mask, intersected with the caller's mask."""
    if mask is None:
        return pattern
    if mask.dtype == torch.bool:
        return pattern & mask
    return mask.masked_fill(~pattern, -torch.inf)


# ---------------------------------------------------------------- blocked path vs dense mask
@settings(max_examples=60)
@given(data=st.data())
def test_blocked_path_equals_exact_attention_under_the_dense_mask(data):
    name = data.draw(st.sampled_from(NAMES), label="name")
    n = data.draw(st.integers(1, 40), label="N")
    B, H, D = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5))
    causal = data.draw(st.booleans(), label="causal")
    kind = data.draw(st.sampled_from(["none", "bool", "float"]), label="mask")
    mech = attnlab.create(name, backend="blocked", **hparams_for(name, data, n))
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64).requires_grad_()
               for _ in range(3))
    mask = user_mask(kind, B, n, seed=n)
    # Scores per chunk: the default (one chunk here), or chunks of one query block each.
    chunk = data.draw(st.sampled_from([blocksparse._CHUNK, 1]), label="chunk")
    with mock.patch.object(blocksparse, "_CHUNK", chunk):
        out = mech(q, k, v, attn_mask=mask, is_causal=causal)
    ref_mask = combined(dense_allowed(name, mech, n, causal), mask)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = naive_attention_f64(q2, k2, v2, ref_mask)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(dout)
    ref.backward(dout)
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@settings(max_examples=40)
@given(data=st.data())
def test_forward_without_autograd_equals_exact_attention_under_the_dense_mask(data):
    # Its own path: each chunk gathers its blocks and writes its rows into the output,
    # and a query block seeing too many keys goes a few heads at a time (chunk = 1).
    name = data.draw(st.sampled_from(NAMES), label="name")
    n = data.draw(st.integers(1, 40), label="N")
    B, H, D = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    causal = data.draw(st.booleans(), label="causal")
    kind = data.draw(st.sampled_from(["none", "bool", "float", "per-head"]), label="mask")
    mech = attnlab.create(name, backend="blocked", **hparams_for(name, data, n))
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for _ in range(3))
    if kind == "per-head":
        mask = torch.rand(B, H, n, n, generator=g) < 0.6
    else:
        mask = user_mask(kind, B, n, seed=n)
    chunk = data.draw(st.sampled_from([blocksparse._CHUNK, 1]), label="chunk")
    with mock.patch.object(blocksparse, "_CHUNK", chunk), torch.no_grad():
        out = mech(q, k, v, attn_mask=mask, is_causal=causal)
    ref = naive_attention_f64(q, k, v, combined(dense_allowed(name, mech, n, causal), mask))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_float_mask_gradient_reaches_only_allowed_pairs():
    mech = attnlab.create("sliding_window", window=4, block_size=3)
    q, k, v = (torch.randn(1, 2, 10, 3, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(10, 10, dtype=torch.float64, requires_grad=True)
    mech(q, k, v, attn_mask=bias).sum().backward()
    bias2 = bias.detach().clone().requires_grad_()
    pattern = dense_allowed("sliding_window", mech, 10, False)
    naive_attention_f64(q, k, v, bias2.masked_fill(~pattern, -torch.inf)).sum().backward()
    torch.testing.assert_close(bias.grad, bias2.grad.masked_fill(~pattern, 0.0))
    assert bias.grad[~pattern].abs().max() == 0


# ---------------------------------------------------------------- FlexAttention path
# One shape, dtype and block size for every flex case: torch.compile then builds the kernel
# once (the predicate reads every pattern's parameters from tensors). N = 50 is not a
# multiple of the block size, so padding is exercised too.
FLEX_SHAPE, FLEX_BLOCK = (2, 2, 50, 8), 16
FLEX_HP = {
    "local": {}, "sliding_window": dict(window=9), "dilated_window": dict(window=5, dilation=3),
    "longformer": dict(window=6, global_tokens=(0, 17, -1)),
    "bigbird": dict(window=4, global_tokens=(3,), num_random_blocks=2, seed=7),
    "sparse_transformer": dict(pattern="strided", stride=7),
    "block_sparse": dict(layout=torch.rand(4, 4, generator=torch.Generator().manual_seed(3)) < 0.5),
}
FLEX_CASES = [(n, c) for n in NAMES for c in (False, True)] + [("sparse_transformer_fixed", True)]


def flex_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(FLEX_SHAPE, generator=g) for _ in range(3))


def flex_pair(name):
    hp = dict(FLEX_HP.get(name, {}), block_size=FLEX_BLOCK)
    if name == "sparse_transformer_fixed":
        name, hp = "sparse_transformer", dict(pattern="fixed", stride=10, c=3, block_size=FLEX_BLOCK)
    return name, attnlab.create(name, backend="flex", **hp)


def test_flex_path_equals_exact_attention_under_the_dense_mask():
    q, k, v = flex_inputs()
    for case, causal in FLEX_CASES:
        name, mech = flex_pair(case)
        assert mech.backend_for(q, k, v) == "flex"
        out = mech(q, k, v, is_causal=causal)
        ref = naive_attention_f64(q, k, v, dense_allowed(name, mech, q.shape[2], causal))
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, msg=f"{case} {causal}")


@pytest.mark.slow  # two more kernels: a bool mask in mask_mod, a float one in score_mod
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_flex_path_honours_masks_and_gives_zero_rows(kind):
    q, k, v = flex_inputs(1)
    mask = user_mask(kind, 2, 50, seed=4)
    mask = mask if kind == "bool" else mask.float()
    for case, causal in [("longformer", False), ("bigbird", True), ("block_sparse", False)]:
        name, mech = flex_pair(case)
        out = mech(q, k, v, attn_mask=mask, is_causal=causal)
        ref = naive_attention_f64(q, k, v, combined(dense_allowed(name, mech, 50, causal), mask))
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, msg=case)
        assert out[0, :, 25].abs().max() == 0  # the row the mask blocks entirely


def test_flex_with_grad_on_cpu_is_refused_and_auto_falls_back_to_blocked():
    q, k, v = (t.requires_grad_() for t in flex_inputs())
    _, flex = flex_pair("sliding_window")
    with pytest.raises(NotImplementedError, match=r"sliding_window: backend='flex' has no "
                                                  r"backward on CPU .* backend='blocked'"):
        flex(q, k, v)
    auto = attnlab.create("sliding_window", window=9, block_size=FLEX_BLOCK)
    assert auto.hp["backend"] == "auto" and auto.backend_for(q, k, v) == "blocked"
    with torch.no_grad():
        assert auto.backend_for(q, k, v) == "blocked"  # CPU: never compiles unasked
    auto(q, k, v).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad():
        assert flex.backend_for(q, k, v) == "flex"  # no grad needed: flex may run
    with pytest.raises(ValueError, match=r"backend='flex' has no attention dropout; got dropout_p=0.1"):
        flex(q.detach(), k.detach(), v.detach(), dropout_p=0.1)
    with pytest.raises(TypeError, match=r"backend='flex' supports float32/float16/bfloat16; got torch.float64"):
        flex(*(t.detach().double() for t in (q, k, v)))
    small = attnlab.create("local", backend="flex", block_size=8)
    with torch.no_grad(), pytest.raises(ValueError, match=r"local: backend='flex' needs "
                                                          r"block_size to be a multiple of 16"):
        small(*flex_inputs())


# ---------------------------------------------------------------- limit cases
def full_attention_grads(q, k, v, causal):
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = naive_attention_f64(q2, k2, v2, is_causal=causal)
    out.pow(2).sum().backward()
    return out, (q2.grad, k2.grad, v2.grad)


N_LIMIT = 23
LIMITS = [  # (name, hyperparameters that make the pattern full attention, causal)
    ("local", dict(block_size=32), False),
    ("sliding_window", dict(window=N_LIMIT, block_size=5), True),  # causal: i - w < j
    ("sliding_window", dict(window=2 * N_LIMIT, block_size=5), False),  # |i-j| <= w//2
    ("dilated_window", dict(window=2 * N_LIMIT, dilation=1, block_size=4), False),
    ("longformer", dict(window=1, global_tokens=tuple(range(N_LIMIT)), block_size=4), False),
    ("longformer", dict(window=1, global_tokens=tuple(range(N_LIMIT)), block_size=4), True),
    ("bigbird", dict(window=1, global_tokens=tuple(range(N_LIMIT)), num_random_blocks=0,
                     block_size=6), False),
    ("bigbird", dict(window=1, global_tokens=tuple(range(N_LIMIT)), num_random_blocks=2,
                     block_size=6), True),
    ("sparse_transformer", dict(pattern="strided", stride=N_LIMIT, block_size=4), False),
    ("sparse_transformer", dict(pattern="fixed", stride=N_LIMIT + 1, c=1, block_size=4), True),
    ("block_sparse", dict(layout=torch.ones(6, 6, dtype=torch.bool), block_size=4), False),
    ("block_sparse", dict(layout=torch.ones(6, 6, dtype=torch.bool), block_size=4), True),
]


@pytest.mark.parametrize("name,hp,causal", LIMITS)
def test_limit_cases_equal_full_attention(name, hp, causal):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, N_LIMIT, 8, generator=g).requires_grad_() for _ in range(3))
    out = attnlab.create(name, **hp)(q, k, v, is_causal=causal)
    ref, grads = full_attention_grads(q, k, v, causal)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    out.pow(2).sum().backward()
    for t, want in zip((q, k, v), grads, strict=True):
        torch.testing.assert_close(t.grad.double(), want, rtol=0, atol=1e-5)


def test_sparse_transformer_stride_scales_with_the_length():
    # Child et al. 2019, sec. 4.3: the stride l is "chosen to be close to sqrt(n)"; here the
    # multiple of block_size (16) nearest sqrt(N), at least block_size and c.
    lengths = (16, 256, 1024, 2000, 4096, 16384, 65536)
    mech = attnlab.create("sparse_transformer")
    assert mech.hp["stride"] is None
    assert [mech.stride_for(n) for n in lengths] == [16, 16, 32, 48, 64, 128, 256]
    assert attnlab.create("sparse_transformer", stride=100).stride_for(16384) == 100
    assert attnlab.create("sparse_transformer", c=40).stride_for(1024) == 40  # c <= l
    assert mech.pattern(4096, False).summary == (64, 8)
    # Keys scored per query grow as sqrt(N): its own window of l, plus one block of b for
    # each other window's c <= b summary columns, l + b (N/l - 1) = 17 sqrt(N) - 16.
    keys = [mech.pattern(n, False).block_layout().sum(1).max().item() * 16 for n in (1024, 4096)]
    assert keys == [17 * 32 - 16, 17 * 64 - 16]


def test_dilation_one_is_the_sliding_window():
    q, k, v = (torch.randn(1, 2, 30, 4) for _ in range(3))
    for causal in (False, True):
        a = attnlab.create("dilated_window", window=7, dilation=1, block_size=4)(q, k, v, is_causal=causal)
        b = attnlab.create("sliding_window", window=7, block_size=4)(q, k, v, is_causal=causal)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- causality
@pytest.mark.parametrize("name", NAMES)
def test_changing_future_tokens_leaves_earlier_outputs_unchanged(name):
    spec, n = attnlab.get(name), 29
    mech = attnlab.create(name, **spec.tiny_hparams)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, n, 4, generator=g) for _ in range(3))
    out = mech(q, k, v, is_causal=True)
    for t in (5, 17):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t + 1:] = torch.randn(x[:, :, t + 1:].shape, generator=g) * 10
        out2 = mech(q2, k2, v2, is_causal=True)
        torch.testing.assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out2[:, :, t + 1:], out[:, :, t + 1:])  # the test can fail


# ---------------------------------------------------------------- memory: never N x N


@pytest.mark.parametrize("name,hp", [("sliding_window", dict(window=64, block_size=64)),
                                     ("longformer", dict(window=64, block_size=32)),
                                     ("bigbird", dict(window=64, block_size=32))])
def test_blocked_path_never_materialises_n_by_n(name, hp):
    N, w = 1024, 64
    q, k, v = (torch.randn(1, 1, N, 16).requires_grad_() for _ in range(3))
    mech = attnlab.create(name, **hp)
    mech(q, k, v)  # the first call builds the plan (block layout, predicate tiles), cached
    with LargestTensor() as mode, saved_numels() as saved:
        mech(q, k, v).sum().backward()
    assert max(saved) < N * N / 4, max(saved)
    assert max(saved) <= 8 * N * (w + 2 * hp["block_size"]), max(saved)  # O(N w)
    assert mode.largest < N * N / 4, mode.largest


# ---------------------------------------------------------------- hyperparameters and errors
BAD_HP = [
    ("sliding_window", dict(window=0), ValueError, r"sliding_window: hyperparameter 'window' must be >= 1; got 0"),
    ("local", dict(block_size=0), ValueError, r"local: hyperparameter 'block_size' must be >= 1; got 0"),
    ("dilated_window", dict(dilation=0), ValueError, r"dilated_window: hyperparameter 'dilation' must be >= 1; got 0"),
    ("bigbird", dict(num_random_blocks=-1), ValueError, r"'num_random_blocks' must be >= 0; got -1"),
    ("sparse_transformer", dict(stride=4, c=5), ValueError, r"sparse_transformer: hyperparameter 'c' must be <= stride=4; got 5"),
    ("sparse_transformer", dict(pattern="strided2"), ValueError, r"'pattern' must be one of \['strided', 'fixed'\]"),
    ("longformer", dict(global_tokens=[0]), TypeError, r"'global_tokens' must be tuple; got list"),
    ("longformer", dict(global_tokens=(0, "a")), TypeError, r"longformer: hyperparameter 'global_tokens' must be a tuple of ints"),
    ("longformer", dict(backend="flx"), ValueError, r"'backend' must be one of \['auto', 'blocked', 'flex'\]"),
    ("block_sparse", dict(layout=torch.ones(2, 2)), TypeError, r"block_sparse: layout must be a bool tensor .* got torch.float32"),
    ("block_sparse", dict(layout=torch.ones(2, dtype=torch.bool)), ValueError, r"block_sparse: layout must be 2-D .* got shape \(2,\)"),
]


@pytest.mark.parametrize("name,hp,exc,pattern", BAD_HP)
def test_bad_hyperparameters_give_clear_errors(name, hp, exc, pattern):
    with pytest.raises(exc, match=pattern):
        attnlab.create(name, **hp)


@pytest.mark.parametrize("name,hp,pattern", [
    ("longformer", dict(global_tokens=(16,)), r"longformer: global_tokens index 16 is out of range for N=16 \(expected -16 <= index < 16\)"),
    ("bigbird", dict(global_tokens=(0, -17)), r"bigbird: global_tokens index -17 is out of range for N=16"),
    ("block_sparse", dict(block_size=4, layout=torch.ones(3, 4, dtype=torch.bool)), r"block_sparse: layout of shape \(3, 4\) is too small for N=16 at block_size=4; expected at least \(4, 4\)"),
])
def test_length_dependent_errors_at_call_time(name, hp, pattern):
    q = torch.randn(1, 1, 16, 4)
    mech = attnlab.create(name, **hp)
    with pytest.raises(ValueError, match=pattern):
        mech(q, q, q)


# ---------------------------------------------------------------- bigbird and block_sparse details
def test_bigbird_random_blocks_are_seeded_uncovered_and_r_per_row():
    n, b, r = 64, 4, 3
    mech = attnlab.create("bigbird", window=4, global_tokens=(0,), num_random_blocks=r, block_size=b)
    R = mech.random_blocks(n)
    covered = dense_allowed("longformer", attnlab.create("longformer", window=4, block_size=b), n, False)
    covered = covered.view(n // b, b, n // b, b).any(3).any(1)  # blocks with an allowed pair
    assert not (R & covered).any()
    assert (R.sum(1) == torch.clamp((~covered).sum(1), max=r)).all()
    assert torch.equal(R, mech.random_blocks(n))  # same seed, same draw
    other = attnlab.create("bigbird", window=4, num_random_blocks=r, block_size=b, seed=1)
    assert not torch.equal(R, other.random_blocks(n))


def test_block_sparse_set_layout_and_default():
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=torch.float64) for _ in range(3))
    mech = attnlab.create("block_sparse", block_size=4)
    local = attnlab.create("local", block_size=4)
    torch.testing.assert_close(mech(q, k, v), local(q, k, v))  # default: block diagonal
    layout = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    mech.set_layout(layout)
    assert "layout=bool(3, 3)" in repr(mech)
    want = naive_attention_f64(q, k, v, layout.repeat_interleave(4, 0).repeat_interleave(4, 1))
    torch.testing.assert_close(mech(q, k, v), want)
    mech.set_layout(~layout | torch.eye(3, dtype=torch.bool))  # the plan cache sees the change
    want = naive_attention_f64(q, k, v, (~layout | torch.eye(3, dtype=torch.bool))
                               .repeat_interleave(4, 0).repeat_interleave(4, 1))
    torch.testing.assert_close(mech(q, k, v), want)


def test_demo_defaults_run_at_short_lengths():
    q = torch.randn(1, 2, 32, 8)
    for name in NAMES:
        out = attnlab.create_for(name, head_dim=8, num_heads=2, max_seq_len=32)(q, q, q)
        assert out.shape == q.shape and torch.isfinite(out).all()
