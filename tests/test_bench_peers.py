"""PyPI peers as benchmark mechanisms (attnlab.bench.peers): grid entries, the
not-installed path (runs in CI, where the peers are absent), each installed peer's
correctness gate in its limit case and against a deliberately broken copy, and one tiny
sweep that times ``local`` and ``peer:local_attention`` side by side."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import naive_attention_f64

from attnlab.bench import peers
from attnlab.bench.grid import make_grid
from attnlab.bench.runner import run_sweep
from attnlab.bench.store import Store

FAST = {"min_run_time": 0.01, "timeout_s": 60.0, "threads": 1}
INSTALLED = [pytest.param(name, marks=pytest.mark.skipif(
    not peers.available(name), reason=f"{peers.PEERS[name].module} not installed"))
    for name in peers.PEERS]


def _need(name: str):
    return pytest.importorskip(peers.PEERS[name].module)


# ------------------------------------------------------------------------------- grid
def test_grid_accepts_peer_entries_with_their_defaults_in_the_label():
    g = make_grid(mechanisms=["sdpa", "peer:local_attention",
                              {"name": "peer:reformer-pytorch", "n_hashes": 1}],
                  lengths=[256], batch=[1], heads=[1], head_dim=[16], **FAST)
    by = {p.mechanism: p for p in g.points()}
    assert set(by) == {"sdpa", "peer:local_attention", "peer:reformer_pytorch"}
    assert by["peer:local_attention"].label == (
        "peer:local_attention(look_backward=1, look_forward=1, window_size=256)")
    assert dict(by["peer:reformer_pytorch"].hparams) == {
        "attend_across_buckets": False, "bucket_size": 64, "n_hashes": 1}


@pytest.mark.parametrize("entry,pattern", [
    ("peer:local_atention", r"unknown name 'peer:local_atention'; did you mean "
                            r"'peer:local_attention'\?"),
    ("peer:linformer", r"layer-level peer .*kernel-level peers only: performer_pytorch"),
    ({"name": "peer:local_attention", "windw_size": 8},
     r"peer:local_attention: unknown hyperparameter 'windw_size' \(did you mean "
     r"'window_size'\?\)"),
    ({"name": "peer:performer_pytorch", "nb_features": 0},
     r"'nb_features' must be >= 1; got 0"),
    ({"name": "peer:reformer_pytorch", "attend_across_buckets": 1}, r"must be a bool; got int"),
])
def test_grid_rejects_bad_peer_entries_with_the_reason(entry, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_grid(mechanisms=[entry], lengths=[8])


def test_unsupported_points_say_why(monkeypatch):
    monkeypatch.setattr(peers, "available", lambda name: True)  # flags, not the install
    g = make_grid(mechanisms=["peer:reformer_pytorch", "peer:performer_pytorch"],
                  lengths=[64, 128], dtypes=["float32", "float16"], **FAST)
    why = {(p.mechanism, p.N, p.dtype): p.unsupported() for p in g.points()}
    assert why[("peer:reformer_pytorch", 64, "float32")] == (
        "peer:reformer_pytorch needs N divisible by 2 * bucket_size = 128; got N=64")
    assert why[("peer:reformer_pytorch", 128, "float32")] is None
    assert why[("peer:performer_pytorch", 64, "float16")] == (
        "peer:performer_pytorch does not take float16")
    assert why[("peer:performer_pytorch", 64, "float32")] is None


def test_a_peer_that_is_not_installed_is_unsupported_and_the_sweep_goes_on(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(peers, "available", lambda name: False)
    g = make_grid(mechanisms=["peer:local_attention", "peer:performer_pytorch", "sdpa"],
                  lengths=[16], batch=[1], heads=[1], head_dim=[8], **FAST)
    with Store(tmp_path / "b.db") as s:
        rid = run_sweep(g, s, progress=False)
        rows = {r["mechanism"]: r for r in s.measurements(rid)}
        assert s.run(rid)["status"] == "done"
    for name in ("peer:local_attention", "peer:performer_pytorch"):
        r = rows[name]
        assert r["status"] == "unsupported" and r["time_s"] is None
        assert r["message"].endswith("is not installed: pip install 'attnlab[peers]'")
    assert rows["sdpa"]["status"] == "ok" and rows["sdpa"]["time_s"] > 0
    # Asked directly, the gate reports instead of raising; build says how to install.
    res = peers.verify_peer("peer:local_attention")
    assert not res.ok and "pip install 'attnlab[peers]'" in res.message
    with pytest.raises(ModuleNotFoundError, match=r"attnlab\[peers\]"):
        peers.build("peer:local_attention", n=8, head_dim=8, num_heads=1)


def test_list_and_lookup():
    assert peers.list_peers() == ["performer_pytorch", "local_attention", "reformer_pytorch"]
    assert set(peers.list_peers(installed=True)) | set(peers.list_peers(installed=False)) == \
        set(peers.PEERS)
    assert peers.resolve("Local-Attention") is peers.PEERS["local_attention"]
    with pytest.raises(TypeError, match="must be a str"):
        peers.resolve(3)


# ------------------------------------------------------------------------------- gates
@pytest.mark.parametrize("name", INSTALLED)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_installed_peer_passes_its_limit_case(name, causal, dtype):
    _need(name)
    # Benchmark-sized hyperparameters are given on purpose: the limit's overrides win.
    hp = {"performer_pytorch": {"nb_features": 64}, "local_attention": {"window_size": 3},
          "reformer_pytorch": {"bucket_size": 4, "n_hashes": 3}}[name]
    res = peers.verify_peer(name, n=32, head_dim=8, num_heads=3, batch=2, dtype=dtype,
                            causal=causal, seed=1, **hp)
    assert res.ok, res
    assert res.name == f"peer:{name}" and res.error <= res.tol


@pytest.mark.parametrize("name", INSTALLED)
@pytest.mark.parametrize("causal", [False, True])
def test_a_broken_peer_fails_its_gate(name, causal, monkeypatch):
    _need(name)
    spec = peers.PEERS[name]

    def broken(*args):
        mech = spec.build(*args)
        run = mech._run
        mech._run = lambda m, q, k, v, c: run(m, q, k, v, c) * 1.05
        return mech

    monkeypatch.setitem(peers.PEERS, name, dataclasses.replace(spec, build=broken))
    res = peers.verify_peer(name, n=32, head_dim=8, causal=causal)
    assert not res.ok and res.error > res.tol, res


def test_the_gate_reports_a_peer_that_raises(monkeypatch):
    _need("local_attention")
    spec = peers.PEERS["local_attention"]

    def raising(*args):
        raise RuntimeError("boom")

    monkeypatch.setitem(peers.PEERS, "local_attention", dataclasses.replace(spec, build=raising))
    res = peers.verify_peer("local_attention", n=8)
    assert not res.ok and res.message == "raised RuntimeError: boom"


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(name="peer:performer_pytorch", dtype=torch.float16), TypeError,
     "does not take float16"),
    (dict(name="peer:reformer_pytorch", n=7), ValueError, "n=7 cannot be used"),
    (dict(name="peer:local_attention", n=0), ValueError, "n must be an int >= 1; got 0"),
    (dict(name="peer:local_attention", causal=1), TypeError, "causal must be a bool"),
    (dict(name="peer:local_attention", window=4), TypeError, "unknown hyperparameter 'window'"),
])
def test_verify_peer_refuses_bad_arguments(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        peers.verify_peer(kw.pop("name"), **kw)


# ------------------------------------------------------------------- the peers themselves
def test_local_attention_masks_the_keys_its_autopad_adds():
    # 40 tokens in windows of 32 that see each other: exact attention, but only if the 24
    # zero keys autopad appends are masked (the peer leaves them in the softmax).
    _need("local_attention")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mech = peers.build("peer:local_attention", {"window_size": 32}, n=40, head_dim=8,
                       num_heads=2, dtype=torch.float64)
    for causal in (False, True):
        out = mech(q, k, v, is_causal=causal)
        torch.testing.assert_close(out, naive_attention_f64(q, k, v, is_causal=causal))


def test_performer_peer_approaches_softmax_with_many_features():
    # The gate checks the peer against FAVOR+ with its own features; this checks that
    # FAVOR+ is what approximates softmax (Monte Carlo: ~0.03 measured, 4096 features).
    _need("performer_pytorch")
    from attnlab.mechanisms.kernel import performer_limit_inputs

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 64, generator=g, dtype=torch.float64) for _ in range(3))
    q, k, v = performer_limit_inputs(q, k, v, g)
    mech = peers.build("peer:performer_pytorch", {"nb_features": 4096}, n=64, head_dim=64,
                       num_heads=2, dtype=torch.float64)
    ref = naive_attention_f64(q, k, v)
    err = float((mech(q, k, v) - ref).abs().max() / ref.abs().max())
    assert err < 0.1
    # The same seed draws the same features; the causal form shares them.
    again = peers.build("peer:performer_pytorch", {"nb_features": 4096}, n=64, head_dim=64,
                        num_heads=2, dtype=torch.float64)
    assert torch.equal(again.full.projection_matrix, mech.full.projection_matrix)
    assert torch.equal(mech.causal.projection_matrix, mech.full.projection_matrix)


def test_reformer_peer_ignores_k():
    _need("reformer_pytorch")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 8, generator=g) for _ in range(3))
    mech = peers.build("peer:reformer_pytorch", {"bucket_size": 8}, n=32, head_dim=8,
                       num_heads=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        a = mech(q, k, v)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        b = mech(q, torch.zeros_like(k), v)
    assert a.shape == q.shape and torch.equal(a, b)


# ------------------------------------------------------------------------------- sweep
def test_a_tiny_sweep_times_local_and_the_local_attention_peer(tmp_path):
    _need("local_attention")
    g = make_grid(mechanisms=["local", "peer:local_attention"], lengths=[64], batch=[1],
                  heads=[1], head_dim=[16], **FAST)
    with Store(tmp_path / "b.db") as s:
        rid = run_sweep(g, s, progress=False)
        rows = {r["mechanism"]: r for r in s.measurements(rid)}
    assert set(rows) == {"local", "peer:local_attention"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["time_s"] > 0 and r["gate_error"] <= r["gate_tol"]
    peer = rows["peer:local_attention"]
    assert peer["label"].startswith("peer:local_attention(")
    # One 256-window covers the 64 tokens: exact attention, padding keys masked.
    assert peer["error"] < 1e-5 and peer["flops"] > 0
