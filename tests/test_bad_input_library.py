"""Inputs at the edges, for every registered mechanism (found from the registry, so a new
mechanism is covered without editing this file):

* half-precision inputs whose unscaled scores ``q . k`` exceed float16's range;
* empty batches, heads and query/key lengths;
* ``attnlab.attention``'s module cache with hyperparameters that have no exact ``repr``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build, near_range_inputs

import attnlab
from attnlab import functional, registry
from attnlab.verify import naive_attention_f64

ALL = attnlab.list_mechanisms()
HALF = attnlab.list_mechanisms(half_precision=True)


def err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max-norm relative error (as the correctness gate's): max|out - ref| / max|ref|."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------- half precision near 65504
def limit_case(name: str, n: int, d: int, h: int):
    """The mechanism in its registered limit case (as ``attnlab.verify`` builds it) and
    the float64 reference of its own definition there, ``ref(q, k, v, mech, scale)``."""
    spec = attnlab.get(name)
    hp = spec.limit.hparams(n)
    max_seq_len = hp.pop("max_seq_len", n)
    torch.manual_seed(0)
    mech = registry.create_for(name, head_dim=d, num_heads=h, max_seq_len=max_seq_len,
                               **hp).eval()
    if spec.limit.statistical:
        # A Monte Carlo estimate (the Performer) equals no closed formula: its definition is
        # the estimator with these very features, run here in float64.
        twin = copy.deepcopy(mech).double()
        return mech, lambda q, k, v, scale: twin(q, k, v, scale=scale)
    reference = spec.limit.reference or naive_attention_f64
    return mech, lambda q, k, v, scale: reference(q, k, v, mech=mech, scale=scale,
                                                  is_causal=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", HALF)
def test_half_inputs_near_the_float16_range(name, dtype):
    q, k, v = near_range_inputs(dtype)
    D = q.shape[-1]
    scale = D ** -0.5  # the same explicit scale for all, so every error is comparable
    q64, k64, v64 = q.double(), k.double(), v.double()
    # The yardstick: SDPA's own error on these inputs (about the output's rounding).
    sdpa_err = err(attnlab.attention(q, k, v, scale=scale),
                   naive_attention_f64(q64, k64, v64, scale=scale))
    tol = 4 * max(sdpa_err, torch.finfo(dtype).eps)
    mech, reference = limit_case(name, q.shape[-2], D, q.shape[1])
    mech = mech.to(dtype)
    try:
        out = mech(q, k, v, scale=scale)
    except (TypeError, ValueError) as e:  # a refusal is allowed only if it names the dtype
        assert str(dtype) in str(e), f"{name} refused {dtype} without saying why: {e}"
        return
    assert out.dtype == dtype and torch.isfinite(out).all(), f"{name}: NaN/inf in {dtype}"
    with torch.no_grad():
        ref = reference(q64, k64, v64, scale)
    assert err(out, ref) <= tol, f"{name}: error {err(out, ref):.2e} > {tol:.2e} ({dtype})"
    if mech.spec.returns_weights:
        out_w, w = mech(q, k, v, scale=scale, need_weights=True)
        assert w.dtype == dtype and torch.isfinite(w).all() and torch.isfinite(out_w).all()
        assert err(out_w, ref) <= tol
        if mech.spec.exact and mech.spec.limit.reference is None:  # weights: plain softmax
            p = torch.softmax(q64 @ k64.transpose(-2, -1) * scale, dim=-1)
            assert float((w.double() - p).abs().max()) <= tol


# ------------------------------------------------------------------------ empty inputs
EMPTY = {"B=0": (0, 2, 16, 16), "H=0": (2, 0, 16, 16), "Nq=0": (2, 2, 0, 0)}


def _empty_qkv(B, H, Nq, Nk, D=4, Dv=3):
    return (torch.randn(B, H, Nq, D, requires_grad=True),
            torch.randn(B, H, Nk, D, requires_grad=True),
            torch.randn(B, H, Nk, Dv, requires_grad=True))


@pytest.mark.parametrize("case", list(EMPTY))
@pytest.mark.parametrize("name", ALL)
def test_empty_batch_heads_or_queries_give_an_empty_output(name, case):
    spec = attnlab.get(name)
    B, H, Nq, Nk = EMPTY[case]
    if case == "Nq=0" and spec.cross:
        Nk = 16  # no query, but keys to attend
    mech = build(name, 4, 2)  # built for 2 heads: H = 0 is no call to check that against
    q, k, v = _empty_qkv(B, H, Nq, Nk)
    padding = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
    for kw in ({}, {"attn_mask": padding} if spec.key_padding else {},
               {"is_causal": True} if spec.causal else {}):
        out = mech(q, k, v, **kw)
        assert out.shape == (B, H, Nq, 3) and out.dtype == q.dtype, (kw, out.shape)
        out.sum().backward()
    for t in (q, k, v):  # connected to the graph: gradients exist, of the inputs' shapes
        assert t.grad is not None and t.grad.shape == t.shape
    for p in mech.parameters():
        assert p.grad is not None and (p.grad == 0).all()
    if spec.returns_weights:
        out, w = mech(q, k, v, need_weights=True)
        assert out.shape == (B, H, Nq, 3) and w.shape == (B, H, Nq, Nk)


@pytest.mark.parametrize("name", ALL)
def test_no_keys_gives_zeros_as_fully_masked_rows(name):
    spec = attnlab.get(name)
    mech = build(name, 4, 2)
    q, k, v = _empty_qkv(2, 2, 5, 0)
    if not spec.cross:  # Nq = 5 != Nk = 0: the self-attention error, as for any Nq != Nk
        with pytest.raises(ValueError, match=rf"{name} needs Nq == Nk .*Nq=5, Nk=0"):
            mech(q, k, v)
        return
    out = mech(q, k, v)
    assert out.shape == (2, 2, 5, 3) and (out == 0).all()
    (out * torch.randn(out.shape)).sum().backward()
    assert (q.grad == 0).all() and q.grad.shape == q.shape
    assert k.grad.shape == k.shape and v.grad.shape == v.shape
    if spec.returns_weights:
        _, w = mech(q, k, v, need_weights=True)
        assert w.shape == (2, 2, 5, 0)


# ----------------------------------------------------------- attnlab.attention's cache
def _layouts(n: int):
    """Two ``(n, n)`` block layouts whose reprs are equal: they differ only in the middle,
    which a large tensor's repr elides."""
    a = torch.rand(n, n, generator=torch.Generator().manual_seed(0)) < 0.5
    a.fill_diagonal_(True)
    b = a.clone()
    b[n // 2, 3:n - 3] = False
    assert repr(a) == repr(b) and not torch.equal(a, b)
    return a, b


# Per hyperparameter name: the other hyperparameters of the call and two values that must
# give different outputs at N = 40.
VALUE_PAIRS = {
    "layout": ({"block_size": 1}, lambda: _layouts(40)),
    "global_tokens": ({"window": 4, "block_size": 4}, lambda: ((0,), (0, 21))),
    "grid": ({}, lambda: ((5, 8), (8, 5))),
}
# Every hyperparameter of a functional (parameter-free) mechanism whose values are tensors
# or sequences: the ones a key made of repr() could confuse.
COLLECTION_HPARAMS = [(name, h.name) for name in attnlab.list_mechanisms(learnable=False)
                      for h in attnlab.get(name).hparams
                      if issubclass(h.type, (torch.Tensor, list, tuple))]


def test_every_collection_hparam_has_test_values():
    assert ("block_sparse", "layout") in COLLECTION_HPARAMS
    missing = sorted({h for _, h in COLLECTION_HPARAMS} - set(VALUE_PAIRS))
    assert not missing, f"add two differing values of {missing} to VALUE_PAIRS"


@pytest.mark.parametrize("name,hparam", COLLECTION_HPARAMS)
def test_attention_cache_tells_hyperparameter_values_apart(name, hparam):
    context, values = VALUE_PAIRS[hparam]
    a, b = values()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g) for _ in range(3))
    outs = []
    for value in (a, b, a):  # the second a must not be b's module either
        got = attnlab.attention(q, k, v, mechanism=name, **context, **{hparam: value})
        fresh = attnlab.create(name, **context, **{hparam: value})(q, k, v)
        torch.testing.assert_close(got, fresh, rtol=0, atol=0)
        outs.append(got)
    assert (outs[0] - outs[1]).abs().max() > 1e-3, f"{name}: {hparam} values give one output"


def test_cache_keys_are_exact_and_typed():
    key = functional.hparams_key
    assert len({key({"x": 1}), key({"x": 1.0}), key({"x": True})}) == 3
    assert key({"x": (1, 2)}) == key({"x": (1, 2)}) != key({"x": [1, 2]})
    assert key({"x": 0.0}) != key({"x": -0.0}) and key({"x": None}) != key({"x": "None"})
    assert key({"a": 1, "b": "s"}) == key({"b": "s", "a": 1})
    # No exact hashable key: built fresh, never cached.
    assert key({"x": torch.ones(2)}) is None and key({"x": (0, torch.ones(1))}) is None
    layout = torch.ones(4, 4, dtype=torch.bool)
    q = torch.randn(1, 1, 4, 2)
    before = len(functional._CACHE)
    attnlab.attention(q, q, q, mechanism="block_sparse", block_size=1, layout=layout)
    assert len(functional._CACHE) == before
