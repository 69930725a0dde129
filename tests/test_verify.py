"""The correctness gate (attnlab.verify): every mechanism has a limit case and passes it;
broken mechanisms fail it; the gate reports instead of crashing, and refuses bad requests.

The references themselves are evidence only if a wrong mechanism fails against them, hence
the mutations: a scale off by 2x for every mechanism (cosformer excepted: it is
scale-invariant by construction), a pattern bug, noise, and the Performer's classic slips.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab import registry
from attnlab.registry import Limit
from attnlab.verify import VerifyResult, naive_attention_f64, tolerance, verify, verify_all

NAMES = attnlab.list_mechanisms(inputs=None)  # graph and pair ones through their gate
CAUSAL = attnlab.list_mechanisms(inputs=None, causal=True)
CASES = [(n, False) for n in NAMES] + [(n, True) for n in CAUSAL]

# Hyperparameters a long-sequence benchmark uses; the limits must make them valid at small n.
BENCH = {
    "sliding_window": dict(window=256, block_size=64),
    "dilated_window": dict(window=256, dilation=2, block_size=128),
    "local": dict(block_size=256),
    "longformer": dict(window=256, block_size=128),
    "bigbird": dict(window=256, block_size=64, num_random_blocks=3),
    "block_sparse": dict(block_size=128),
    "sparse_transformer": dict(stride=128, c=8, block_size=64),
    "reformer": dict(bucket_size=64, n_hashes=4),
    "linformer": dict(k=256),
    "nystromformer": dict(num_landmarks=64, pinv="iterative"),
    "performer": dict(num_features=256),
    "sinkhorn": dict(block_size=64),
    "adaptive_span": dict(max_span=1024, ramp=32, block_size=64),
    "flash": dict(block_q=128, block_k=256),
    "additive": dict(chunk_size=64),
    "synthesizer_factorized_random": dict(rank=16),
}


def wrap_attend(monkeypatch, name, fn):
    """Replace ``name``'s ``_attend`` by ``fn(original, self, q, k, v, mask, causal, scale,
    dropout_p, need_weights)``."""
    cls = attnlab.get(name).cls
    original = cls._attend

    def attend(self, *args):
        return fn(original, self, *args)

    monkeypatch.setattr(cls, "_attend", attend)


# ---------------------------------------------------------------- every mechanism
@pytest.mark.parametrize("name", NAMES)
def test_every_mechanism_has_a_limit(name):
    spec = attnlab.get(name)
    assert isinstance(spec.limit, Limit), f"{name} has no Limit: register it with limit=..."
    assert spec.limit.note and 0 < spec.limit.tol <= 0.05
    for n in (1, 7, 64):
        assert isinstance(spec.limit.hparams(n), dict)
    assert spec.to_dict()["limit"] == spec.limit.note


@pytest.mark.parametrize("name,causal", CASES)
def test_verify_passes_at_the_defaults(name, causal):
    r = verify(name, causal=causal)
    assert isinstance(r, VerifyResult) and r.name == name
    assert r.ok, r
    assert 0 <= r.error <= r.tol == attnlab.get(name).limit.tol
    assert r.note == attnlab.get(name).limit.note


@pytest.mark.parametrize("name", NAMES)
def test_verify_passes_with_benchmark_hparams_and_shapes(name):
    hp = BENCH.get(name, {})
    for n, d, causal in ((100, 32, False), (256, 128, attnlab.get(name).causal)):
        r = verify(name, n=n, head_dim=d, num_heads=2, batch=1, causal=causal, seed=3, **hp)
        assert r.ok, r


@pytest.mark.parametrize("n", [1, 2, 5])
def test_limits_make_benchmark_hparams_valid_on_tiny_inputs(n):
    for name in NAMES:
        r = verify(name, n=n, head_dim=8, **BENCH.get(name, {}))
        assert r.ok, r


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(NAMES), n=st.integers(1, 40), d=st.integers(8, 24),
       heads=st.integers(1, 3), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_verify_passes_for_any_shape_and_seed(name, n, d, heads, causal, seed):
    spec = attnlab.get(name)
    causal = causal and spec.causal
    d = _round_up(d, spec)
    r = verify(name, n=n, head_dim=d, num_heads=heads, batch=1, causal=causal, seed=seed)
    assert r.ok, r


def _round_up(d: int, spec) -> int:
    """The head size a mechanism's declared head_dim takes (differential: even)."""
    try:
        mult = spec.hparam("head_dim").multiple_of or 1
    except KeyError:
        return d
    return -(-d // mult) * mult


@pytest.mark.parametrize("name", ["reference", "flash", "dot", "general", "additive",
                                  "sliding_window", "bigbird", "linformer", "nystromformer",
                                  "reformer", "sinkhorn", "linear", "cosformer",
                                  "adaptive_span", "synthesizer_dense"])
def test_float64_passes_with_the_tight_tolerance(name):
    causal = attnlab.get(name).causal
    r = verify(name, dtype=torch.float64, causal=causal)
    assert r.tol == max(attnlab.get(name).limit.tol * 1e-6, 1e-10) <= 1e-9
    assert r.ok, r


def test_statistical_limit_keeps_its_tolerance_in_float64():
    r = verify("performer", dtype=torch.float64)
    assert r.ok and r.tol == attnlab.get("performer").limit.tol, r


@pytest.mark.parametrize("dtype,floor", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("name", ["reference", "sdpa", "flash", "sliding_window", "reformer",
                                  "linear", "dot"])
def test_half_precision_passes_with_its_tolerance(name, dtype, floor):
    r = verify(name, dtype=dtype, n=128, head_dim=64)
    assert r.tol == max(attnlab.get(name).limit.tol, floor)
    assert r.ok, r


def test_tolerance_per_dtype():
    lim = Limit(hparams=lambda n: {}, note="x", tol=1e-4)
    assert tolerance(lim, torch.float32) == 1e-4
    assert tolerance(lim, torch.float64) == pytest.approx(1e-10)
    assert tolerance(dataclasses.replace(lim, tol=1e-2), torch.float64) == pytest.approx(1e-8)
    assert tolerance(lim, torch.float16) == 2e-2
    assert tolerance(lim, torch.bfloat16) == 5e-2
    assert tolerance(dataclasses.replace(lim, statistical=True), torch.float64) == 1e-4


def test_verify_all_covers_the_registry():
    results = verify_all()
    assert [r.name for r in results] == NAMES and all(r.ok for r in results), results
    causal = verify_all(causal=True, n=16, hparams={"flash": dict(block_q=4, block_k=8)})
    assert [r.name for r in causal] == CAUSAL and all(r.ok for r in causal)
    with pytest.raises(ValueError, match=r"verify_all: hparams for unknown mechanisms \['nope'\]"):
        verify_all(hparams={"nope": {}})


def test_verify_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = verify("additive", seed=5)  # learnable: its parameters come from the seeded fork
    assert torch.equal(torch.get_rng_state(), state)
    b = verify("additive", seed=5)
    assert a == b and a.error > 0
    assert verify("additive", seed=6).error != a.error


def test_exact_reference_is_softmax_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(naive_attention_f64(q, k, v, is_causal=causal), want)


# ---------------------------------------------------------------- broken mechanisms fail
# hard is left out too: its eval form is an argmax, which no positive scale moves; and the
# graph and pair mechanisms, which take no scale (their own tests break their gates).
@pytest.mark.parametrize("name,causal", [c for c in CASES if c[0] not in ("cosformer", "hard")
                                         and attnlab.get(c[0]).inputs == "qkv"])
def test_a_scale_off_by_two_fails(monkeypatch, name, causal):
    # cosformer is left out: relu features are positively homogeneous, so a scale on q
    # cancels (up to eps) and a 2x scale is *correct* output there.
    wrap_attend(monkeypatch, name,
                lambda f, self, q, k, v, m, c, scale, *a: f(self, q, k, v, m, c, 2 * scale, *a))
    r = verify(name, causal=causal)
    assert not r.ok and r.error > r.tol, r


@pytest.mark.parametrize("name", ["reference", "flash", "sliding_window", "linformer",
                                  "synthesizer_random", "performer"])
def test_noise_fails(monkeypatch, name):
    def noisy(f, self, *args):
        out, w = f(self, *args)
        return out + 0.1 * torch.randn_like(out), w

    wrap_attend(monkeypatch, name, noisy)
    r = verify(name)
    assert not r.ok and r.error > r.tol, r


def test_a_pattern_bug_fails(monkeypatch):
    cls = attnlab.get("sliding_window").cls
    original = cls.pattern

    def quarter_window(self, n, causal):  # a window four times too small
        self.hp["window"] //= 4
        try:
            return original(self, n, causal)
        finally:
            self.hp["window"] *= 4

    monkeypatch.setattr(cls, "pattern", quarter_window)
    for causal in (False, True):
        r = verify("sliding_window", causal=causal)
        assert not r.ok and r.error > 10 * r.tol, r


@pytest.mark.parametrize("mutation", ["scale", "scale_not_sqrt", "no_norm"])
def test_performer_slips_fail(monkeypatch, mutation):
    cls = attnlab.get("performer").cls
    features = cls._features

    def broken(self, q, k, is_causal, scale, keep):
        if mutation == "scale":  # exp(2 q.k / sqrt(D)) estimated
            return features(self, q, k, is_causal, 2 * scale, keep)
        if mutation == "scale_not_sqrt":  # x = q * scale instead of q * scale^(1/2)
            return features(self, q, k, is_causal, scale * scale, keep)
        pq, pk, log_scale, floor = features(self, q, k, is_causal, scale, keep)
        half = 0.5 * scale  # |x|^2/2 dropped
        return (pq * torch.exp(half * (q * q).sum(-1, keepdim=True)),
                pk * torch.exp(half * (k * k).sum(-1, keepdim=True)), log_scale, floor)

    monkeypatch.setattr(cls, "_features", broken)
    for d in (16, 64):
        r = verify("performer", head_dim=d, n=128)
        assert not r.ok and r.error > r.tol and "raised" not in r.message, r  # wrong, not crashed


# ---------------------------------------------------------------- reports, never crashes
def test_an_exception_in_the_mechanism_is_reported(monkeypatch):
    def boom(f, self, *args):
        raise RuntimeError("kernel exploded")

    wrap_attend(monkeypatch, "flash", boom)
    r = verify("flash")
    assert not r.ok and r.error == math.inf
    assert r.message == "raised RuntimeError: kernel exploded"


def test_nan_and_wrong_shapes_are_reported(monkeypatch):
    wrap_attend(monkeypatch, "sdpa",
                lambda f, self, *a: (f(self, *a)[0].index_fill(2, torch.tensor([3]), math.nan),
                                     None))
    r = verify("sdpa")
    assert not r.ok and r.error == math.inf and "NaN/inf" in r.message
    wrap_attend(monkeypatch, "reference", lambda f, self, *a: (f(self, *a)[0][:, :, :-1], None))
    r = verify("reference")
    assert not r.ok and "output shape (2, 2, 63, 16), expected (2, 2, 64, 16)" in r.message


def test_invalid_mechanism_hparams_are_reported():
    # A benchmark's value that the limit leaves alone and the mechanism rejects.
    r = verify("sparse_transformer", pattern="strided", block_size=0)
    assert not r.ok and "'block_size' must be >= 1; got 0" in r.message


# ---------------------------------------------------------------- bad requests raise
def test_bad_requests_raise():
    with pytest.raises(ValueError, match=r"unknown name 'flashh'; did you mean 'flash'"):
        verify("flashh")
    with pytest.raises(ValueError, match=r"verify: linformer has no causal form"):
        verify("linformer", causal=True)
    with pytest.raises(TypeError, match=r"verify: flash has no hyperparameter 'block'; "
                                        r"accepted: block_k, block_q"):
        verify("flash", block=4)
    with pytest.raises(TypeError, match=r"verify: dtype must be one of .* got torch.int32"):
        verify("flash", dtype=torch.int32)
    with pytest.raises(ValueError, match=r"verify: n must be an int >= 1; got 0"):
        verify("flash", n=0)
    with pytest.raises(TypeError, match=r"verify: causal must be a bool; got int"):
        verify("flash", causal=1)


def test_half_precision_is_refused_where_unsupported(monkeypatch):
    spec = attnlab.get("dot")
    monkeypatch.setitem(registry._REGISTRY, "dot", dataclasses.replace(spec, half_precision=False))
    with pytest.raises(TypeError, match=r"verify: dot does not support torch.float16"):
        verify("dot", dtype=torch.float16)


def test_a_mechanism_without_limit_is_refused(monkeypatch):
    spec = attnlab.get("dot")
    monkeypatch.setitem(registry._REGISTRY, "dot", dataclasses.replace(spec, limit=None))
    with pytest.raises(ValueError, match=r"verify: dot has no limit case"):
        verify("dot")


def test_register_mechanism_checks_the_limit_type():
    with pytest.raises(TypeError, match=r"limit must be a Limit or None; got str"):
        registry.register_mechanism("x", family="f", paper=None, time="", memory="",
                                    equation="", exact=True, causal=True, arbitrary_mask=True,
                                    cross=True, returns_weights=True, limit="window >= N")
