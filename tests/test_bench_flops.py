"""FLOPs, the matmul roof and the hyperparameters of ``attnlab bench`` points.

FLOP counts are checked against references independent of :mod:`attnlab.flops`: causal
pairs counted by materialising the mask, and ``FlopCounterMode`` on a plain two-matmul
attention written here (its backward is autograd's, four matmuls). Roof fractions are
checked with a roof the test chooses, so no timing decides the outcome.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnlab
from attnlab import flops as fl
from attnlab.bench import machine as mach
from attnlab.bench.analysis import render_table, summarise
from attnlab.bench.formatting import CONTEXT_KEYS, describe_hparams
from attnlab.bench.grid import make_grid
from attnlab.bench.measure import (  # importing it teaches the counter too
    count_flops,
    measure_point,
    resolved_hparams,
)
from attnlab.bench.roof import best_roof, check_fraction, record_roof, with_roof_note
from attnlab.bench.runner import run_sweep
from attnlab.bench.schema import SCHEMA_VERSION
from attnlab.bench.store import Store
from attnlab.registry import CONTEXT_HPARAMS, get, register_mechanism

# The mechanisms whose work is softmax(Q K^T) V and nothing else, and Luong's general
# (the same plus q W_a): the exact softmax-attention family.
SOFTMAX_FAMILY = ("dot", "flash", "reference", "scaled_dot", "sdpa")
BILINEAR = ("general",)
FAST = {"min_run_time": 0.01, "timeout_s": 60.0, "threads": 1, "batch": [1], "heads": [2],
        "head_dim": [8]}


def pairs_by_mask(nq: int, nk: int, causal: bool) -> int:
    """Allowed (query, key) pairs counted on the materialised mask (key j <= query i)."""
    allowed = torch.ones(nq, nk, dtype=torch.bool)
    return int((allowed.tril() if causal else allowed).sum())


def counted_naive(B, H, nq, nk, D, Dv, backward: bool) -> float:
    """FlopCounterMode around softmax(q k^T) v written as two matmuls (and autograd)."""
    q = torch.randn(B, H, nq, D, requires_grad=backward)
    k = torch.randn(B, H, nk, D, requires_grad=backward)
    v = torch.randn(B, H, nk, Dv, requires_grad=backward)
    with FlopCounterMode(display=False) as fc:
        out = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        if backward:
            out.sum().backward()
    return float(fc.get_total_flops())


SHAPES = [(1, 1, 16, 16, 8, 8), (2, 3, 7, 19, 4, 4), (1, 2, 19, 7, 8, 4), (2, 1, 33, 33, 16, 5)]


# -------------------------------------------------------------------- analytic models
@pytest.mark.parametrize("nq,nk", [(1, 1), (5, 5), (3, 11), (11, 3), (64, 17), (0, 4)])
def test_causal_pairs_are_the_allowed_entries_of_the_mask(nq, nk):
    assert fl.attention_pairs(nq, nk, True) == pairs_by_mask(nq, nk, True)
    assert fl.attention_pairs(nq, nk, False) == pairs_by_mask(nq, nk, False) == nq * nk


@pytest.mark.parametrize("B,H,nq,nk,D,Dv", SHAPES)
def test_softmax_model_equals_an_independent_count(B, H, nq, nk, D, Dv):
    kw = dict(B=B, H=H, Nq=nq, Nk=nk, D=D, Dv=Dv)
    # Dense: the counter on two plain matmuls is exactly the work (forward and backward).
    assert fl.softmax_attention_flops(**kw) == counted_naive(B, H, nq, nk, D, Dv, False)
    assert fl.softmax_attention_flops(**kw, pass_="fwd+bwd") == counted_naive(
        B, H, nq, nk, D, Dv, True)
    # Causal: the same per-pair work on the allowed pairs only; backward = 2 x forward.
    fwd = 2 * B * H * pairs_by_mask(nq, nk, True) * (D + Dv)
    assert fl.softmax_attention_flops(**kw, causal=True) == fwd
    assert fl.softmax_attention_flops(**kw, causal=True, pass_="fwd+bwd") == 3 * fwd


@pytest.mark.parametrize("B,H,nq,nk,D,Dv", [s for s in SHAPES if s[4] % 2 == 0])
def test_differential_model_counts_two_half_head_maps(B, H, nq, nk, D, Dv):
    # Two softmax maps, each scoring on D/2 and applied to the whole V, counted by the
    # profiler on plain matmuls (no zero padding): the model is that count, dense and
    # causal (allowed pairs only).
    kw = dict(B=B, H=H, Nq=nq, Nk=nk, D=D, Dv=Dv)
    half = D // 2
    for backward, pass_ in ((False, "fwd"), (True, "fwd+bwd")):
        two_maps = 2 * counted_naive(B, H, nq, nk, half, Dv, backward)
        assert fl.differential_attention_flops(**kw, pass_=pass_) == two_maps
    fwd = 2 * 2 * B * H * pairs_by_mask(nq, nk, True) * (half + Dv)
    assert fl.differential_attention_flops(**kw, causal=True) == fwd
    with pytest.raises(ValueError, match=r"D must be even .*; got 5"):
        fl.differential_attention_flops(**{**kw, "D": 5})


def test_flop_models_refuse_bad_arguments():
    ok = dict(B=1, H=1, Nq=4, Nk=4, D=8)
    with pytest.raises(ValueError, match=r"pass_ must be one of \['fwd', 'fwd\+bwd'\]; got 'bwd'"):
        fl.softmax_attention_flops(**ok, pass_="bwd")
    with pytest.raises(TypeError, match=r"D must be an int; got bool True"):
        fl.softmax_attention_flops(**{**ok, "D": True})
    with pytest.raises(ValueError, match=r"H must be >= 1; got 0"):
        fl.bilinear_attention_flops(**{**ok, "H": 0})
    with pytest.raises(ValueError, match=r"nk must be >= 0; got -1"):
        fl.attention_pairs(3, -1, False)


def test_register_mechanism_resolves_or_refuses_a_flop_model():
    def model(**kw):
        return 1.0

    for bad, err, pattern in [("softmax", ValueError, r"unknown FLOP model 'softmax'; known: "
                                                       r"\['bilinear_attention', "
                                                       r"'differential_attention', "
                                                       r"'softmax_attention'\]"),
                              (3, TypeError, r"flops must be a model name, a callable or None; "
                                             r"got int 3")]:
        with pytest.raises(err, match=pattern):
            register_mechanism("never_registered", family="exact", paper=get("sdpa").paper,
                               time="", memory="", equation="", exact=True, causal=False,
                               arbitrary_mask=False, cross=False, returns_weights=False,
                               flops=bad)
    assert fl.resolve_flop_model(model, "x") is model and fl.model_name(model) == "model"
    assert fl.resolve_flop_model(None, "x") is None


def test_the_exact_family_declares_its_models_and_the_rest_keeps_the_counter():
    declared = {n: fl.model_name(get(n).flops) for n in attnlab.list_mechanisms()
                if get(n).flops is not None}
    assert declared == {**dict.fromkeys(SOFTMAX_FAMILY, "softmax_attention"),
                        **dict.fromkeys(BILINEAR, "bilinear_attention"),
                        "differential": "differential_attention"}
    # differential is not exact but its work is two half-head softmax maps; the profiler
    # would count its zero-padded heads (above the matmul roof).
    assert all(get(n).exact for n in declared if n != "differential")
    # exact=True but not Q K^T work (synthesised logits, an MLP score): counted as run.
    assert {"additive", "synthesizer_dense"} <= set(attnlab.list_mechanisms(exact=True)) - set(
        declared)


# --------------------------------------------------------- what a benchmark point counts
def _point(name, n=24, causal=False, pass_="fwd", hparams=None, B=1, H=2, D=8):
    return {"mechanism": name, "label": name, "hparams": hparams or {}, "N": n, "batch": B,
            "heads": H, "head_dim": D, "dtype": "float32", "pass_": pass_, "causal": causal,
            "device": "cpu"}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_every_exact_mechanism_counts_the_same_work_on_the_same_shape(causal, pass_):
    B, H, N, D = 2, 3, 40, 8
    counts = {}
    for name in SOFTMAX_FAMILY + BILINEAR:
        p = _point(name, N, causal, pass_, B=B, H=H, D=D)
        mech = attnlab.create_for(name, head_dim=D, num_heads=H, max_seq_len=N)
        counts[name], method = count_flops(p, dict(mech.hp), step=None)  # never called
        assert method == f"analytic:{fl.model_name(get(name).flops)}"
    pairs = pairs_by_mask(N, N, causal)
    fwd = 4 * B * H * pairs * D
    factor = 3 if pass_ == "fwd+bwd" else 1
    assert {counts[n] for n in SOFTMAX_FAMILY} == {factor * fwd}
    assert counts["general"] == factor * (fwd + 2 * B * H * N * D * D)  # + q W_a


def test_the_counter_agrees_where_a_mechanism_runs_exactly_the_needed_matmuls():
    # reference and general (dense) execute exactly the work their model states: the
    # profiler's count and the model's agree there, an independent check of both.
    B, H, N, D = 1, 2, 32, 8
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    for name in ("reference", "general", "scaled_dot"):
        mech = attnlab.create_for(name, head_dim=D, num_heads=H, max_seq_len=N)
        with FlopCounterMode(display=False) as fc:
            mech(q, k, v)
        analytic, _ = count_flops(_point(name, N, B=B, H=H, D=D), dict(mech.hp), None)
        assert fc.get_total_flops() == analytic


def test_a_flop_model_returning_nonsense_is_an_error(monkeypatch):
    from types import SimpleNamespace

    from attnlab.bench import measure as m

    def nan_model(**kw):
        return float("nan")

    monkeypatch.setattr(m, "get", lambda name: SimpleNamespace(flops=nan_model))
    with pytest.raises(ValueError, match=r"sdpa: its FLOP model nan_model returned nan; "
                                         r"expected a finite number >= 0"):
        count_flops(_point("sdpa"), {}, None)


def test_the_counter_sees_in_place_matmuls():
    a, b, out = torch.randn(2, 8, 4), torch.randn(2, 4, 8), torch.zeros(2, 8, 8)
    with FlopCounterMode(display=False) as fc:
        out.baddbmm_(a, b)
        out[0].addmm_(a[0], b[0])
    assert fc.get_total_flops() == 2 * (2 * 8 * 4 * 8) + 2 * 8 * 4 * 8


def test_sweep_counts_flash_like_sdpa_and_causal_as_half(tmp_path, monkeypatch):
    # Regression: flash was counted at half of sdpa's forward (the counter missed its
    # in-place P V), and causal points at the full square.
    monkeypatch.setattr(mach, "matmul_roof_gflops", lambda *a, **k: 1e6)
    g = make_grid(mechanisms=["sdpa", "flash", "linear"], lengths=[16, 32],
                  passes=["fwd", "fwd+bwd"], causal=[False, True], **FAST)
    with Store(tmp_path / "f.db") as s:
        rows = s.measurements(run_sweep(g, s, progress=False))
    assert {r["status"] for r in rows} == {"ok"}
    for r in rows:
        if r["mechanism"] == "linear":
            assert r["flops_method"] == "FlopCounterMode" and r["flops"] > 0
            continue
        fwd = 4 * 1 * 2 * pairs_by_mask(r["N"], r["N"], r["causal"]) * 8
        assert r["flops"] == fwd * (3 if r["pass_"] == "fwd+bwd" else 1), r
        assert r["flops_method"] == "analytic:softmax_attention"


# ------------------------------------------------------------------------------- roof
def test_a_fraction_above_one_is_an_error_with_its_message():
    assert check_fraction(50.0, 100.0) == (0.5, None)
    assert check_fraction(100.0, 100.0) == (1.0, None)
    assert check_fraction(112.0, 100.0) == (None, "roof fraction 1.12 > 1: FLOPs or roof "
                                                   "mis-measured")
    assert check_fraction(None, 100.0) == check_fraction(5.0, None) == (None, None)
    note = check_fraction(3.0, 1.0)[1]
    assert with_roof_note("", note) == note
    assert with_roof_note(f"slow; {note}", None) == "slow"  # a recomputed fraction clears it
    assert with_roof_note(with_roof_note("x", note), note) == f"x; {note}"  # never twice


def test_start_and_end_roofs_are_kept_and_the_best_is_the_roof():
    m = record_roof({"cpu": "c"}, "start", 80.0)
    m = record_roof(m, "resume", 70.0)
    m = record_roof(m, "end", 95.0)
    assert (m["roof_start_gflops"], m["roof_end_gflops"], m["roof_gflops"]) == (80.0, 95.0, 95.0)
    assert m["roof_samples_gflops"] == [["start", 80.0], ["resume", 70.0], ["end", 95.0]]
    assert best_roof(record_roof(m, "end", 60.0)) == 95.0  # a worse end keeps the best
    assert best_roof({"roof_gflops": 100.0}) == 100.0 and best_roof({}) is None
    with pytest.raises(ValueError, match=r"finite number > 0 GFLOP/s; got nan"):
        record_roof(m, "end", float("nan"))


def _roofs(monkeypatch, *values):
    seq = iter(values)
    monkeypatch.setattr(mach, "matmul_roof_gflops", lambda *a, **k: next(seq))


def test_the_run_stores_both_roofs_and_fractions_against_the_best(tmp_path, monkeypatch):
    # Start roof absurdly low (every fraction > 1, as under load), end roof high: while
    # the run goes, fractions are rejected with the message; at the end they are computed
    # against the best roof and the message is gone.
    _roofs(monkeypatch, 1e-6, 1e4)
    seen = []
    g = make_grid(mechanisms=["sdpa"], lengths=[16, 32], **FAST)
    with Store(tmp_path / "r.db") as s:
        rid = run_sweep(g, s, progress=False, on_row=seen.append)
        rows, machine = s.measurements(rid), s.run(rid)["machine"]
    assert all(r["roof_fraction"] is None and "> 1: FLOPs or roof mis-measured" in r["message"]
               for r in seen)
    assert machine["roof_start_gflops"] == 1e-6 and machine["roof_end_gflops"] == 1e4
    assert machine["roof_gflops"] == 1e4
    for r in rows:
        assert r["roof_fraction"] == pytest.approx(r["gflops_per_s"] / 1e4) and r["message"] == ""


def test_an_interrupted_run_never_stores_a_fraction_above_one(tmp_path, monkeypatch):
    _roofs(monkeypatch, 1e-6)  # no end roof: the run stops first

    def stop(row):
        raise KeyboardInterrupt

    g = make_grid(mechanisms=["sdpa"], lengths=[16, 32], **FAST)
    with Store(tmp_path / "i.db") as s:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(g, s, progress=False, on_row=stop)
        (row,) = s.measurements(1)
        assert s.run(1)["status"] == "interrupted"
        raw = s.db.execute("SELECT roof_fraction, message FROM measurements").fetchone()
    assert row["status"] == "ok" and row["gflops_per_s"] > 1e-6
    assert raw["roof_fraction"] is None
    assert raw["message"] == f"roof fraction {row['gflops_per_s'] / 1e-6:.2f} > 1: FLOPs or " \
                             f"roof mis-measured"
    # Resumed: a roof is sampled on resume and at the end; the best of all three counts,
    # and the point stored before the interruption is recomputed against it.
    _roofs(monkeypatch, 1e4, 50.0)
    with Store(tmp_path / "i.db") as s:
        assert run_sweep(g, s, progress=False) == 1
        rows, machine = s.measurements(1), s.run(1)["machine"]
    assert machine["roof_samples_gflops"] == [["start", 1e-6], ["resume", 1e4], ["end", 50.0]]
    assert machine["roof_gflops"] == 1e4 and machine["roof_end_gflops"] == 50.0
    assert [r["roof_fraction"] for r in rows] == [pytest.approx(r["gflops_per_s"] / 1e4)
                                                  for r in rows]
    assert {r["message"] for r in rows} == {""}


def test_summarise_leaves_out_fractions_above_one():
    rows = [{"mechanism": "sdpa", "label": "sdpa", "N": n, "batch": 1, "heads": 1,
             "head_dim": 8, "dtype": "float32", "pass_": "fwd", "causal": False,
             "device": "cpu", "status": "ok", "time_s": 1e-3 * n, "peak_mem_bytes": 10,
             "roof_fraction": f} for n, f in ((16, 0.4), (32, 1.1))]
    (e,) = summarise(rows)
    assert e["roof"] == {16: 0.4} and e["best_roof"] == 0.4


# ------------------------------------------------------------------------ the v3 schema
V2_MEASUREMENTS = """
CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, started_at TEXT NOT NULL,
    finished_at TEXT, status TEXT NOT NULL, profile TEXT, command TEXT, grid TEXT NOT NULL,
    grid_digest TEXT NOT NULL, machine TEXT NOT NULL, fingerprint TEXT NOT NULL,
    versions TEXT NOT NULL, git_commit TEXT, points_total INTEGER NOT NULL);
CREATE TABLE measurements (id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs(id), point_key TEXT NOT NULL,
    mechanism TEXT NOT NULL, label TEXT NOT NULL, hparams TEXT NOT NULL, N INTEGER NOT NULL,
    batch INTEGER NOT NULL, heads INTEGER NOT NULL, head_dim INTEGER NOT NULL,
    dtype TEXT NOT NULL, pass_ TEXT NOT NULL, causal INTEGER NOT NULL, device TEXT NOT NULL,
    status TEXT NOT NULL, time_s REAL, time_iqr_s REAL, runs INTEGER, peak_mem_bytes INTEGER,
    flops REAL, gflops_per_s REAL, roof_fraction REAL, error REAL, gate_error REAL,
    gate_tol REAL, message TEXT NOT NULL DEFAULT '', wall_s REAL, timed_s REAL,
    finished_at TEXT NOT NULL, UNIQUE (run_id, point_key));
CREATE TABLE trainings (id INTEGER PRIMARY KEY AUTOINCREMENT, run_dir TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL, model TEXT NOT NULL, mechanism TEXT NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL, steps INTEGER NOT NULL, train_time_s REAL NOT NULL, throughput REAL,
    metric TEXT NOT NULL, mode TEXT NOT NULL, best_validation REAL, test_value REAL,
    parameters INTEGER, summary TEXT NOT NULL, config TEXT NOT NULL, versions TEXT NOT NULL,
    machine TEXT NOT NULL, git_commit TEXT, finished_at TEXT NOT NULL);
INSERT INTO runs VALUES (1, 't', 't', 'done', NULL, 'c', '{}', 'd',
    '{"cpu": "c", "cores": 2, "ram_gib": 4.0, "gpu": null, "roof_gflops": 100.0}', 'f',
    '{"torch": "x"}', NULL, 1);
INSERT INTO measurements (run_id, point_key, mechanism, label, hparams, N, batch, heads,
    head_dim, dtype, pass_, causal, device, status, time_s, peak_mem_bytes, flops,
    gflops_per_s, roof_fraction, message, finished_at) VALUES (1, 'k', 'sdpa', 'sdpa', '{}',
    16, 1, 1, 8, 'float32', 'fwd', 1, 'cpu', 'ok', 1e-3, 10, 1.1e8, 110.0, 1.1, '', 't');
PRAGMA user_version=2;
"""


def _v2(path):
    con = sqlite3.connect(path)
    con.executescript(V2_MEASUREMENTS)
    con.close()


def test_a_v2_database_reads_as_it_is_and_upgrades_to_v3(tmp_path):
    db = tmp_path / "v2.db"
    _v2(db)
    before = db.read_bytes()
    with Store(db, readonly=True) as s:  # read as it stands: nothing written
        (old,) = s.measurements(1)
    assert db.read_bytes() == before
    assert old["flops_method"] is None and old["effective_hparams"] is None
    # The old run's 110% of its roof is shown as the error it is, never as a fraction.
    assert old["roof_fraction"] is None
    assert old["message"] == "roof fraction 1.10 > 1: FLOPs or roof mis-measured"
    with Store(db) as s:
        assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        cols = {r[1] for r in s.db.execute("PRAGMA table_info(measurements)")}
        assert {"flops_method", "effective_hparams"} <= cols
        assert s.measurements(1)[0]["flops"] == 1.1e8  # old rows kept
        assert s.add(1, "k2", {**old, "N": 32, "flops_method": "FlopCounterMode",
                               "effective_hparams": {"window": 4}})
        new = s.measurements(1)[1]
    assert new["flops_method"] == "FlopCounterMode" and new["effective_hparams"] == {"window": 4}
    with Store(db) as s:  # opened again: already v3, nothing to do
        assert len(s.measurements(1)) == 2


def test_a_failed_upgrade_leaves_the_database_as_it_was(tmp_path):
    # A v1 file whose "measurements" is a view: CREATE TABLE IF NOT EXISTS passes it by and
    # creates the trainings table, then ALTER TABLE fails on the view. The upgrade is one
    # transaction: no trainings table, still v1, and the error names the file.
    from attnlab.bench.store import StoreError

    db = tmp_path / "odd.db"
    con = sqlite3.connect(db)
    con.executescript(V2_MEASUREMENTS.split("CREATE TABLE measurements")[0])
    con.executescript("CREATE VIEW measurements AS SELECT 1 AS id; PRAGMA user_version=1;")
    con.close()
    with pytest.raises(StoreError, match=r"odd\.db is not an attnlab results database "
                                         r"\(Cannot add a column to a view\)"):
        Store(db)
    con = sqlite3.connect(db)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    con.close()
    assert "trainings" not in tables


# ------------------------------------------------------------- hyperparameters as built
def test_measure_point_returns_the_hyperparameters_as_built():
    # The grid gives block_q only; the point reports block_k too, the registry's default.
    p = _point("flash", 32, hparams={"block_q": 8})
    threads = torch.get_num_threads()
    try:
        res = measure_point(p, {"threads": 1, "min_run_time": 0.01, "error_max_n": 0,
                                "gate": False})
    finally:
        torch.set_num_threads(threads)
    assert res["status"] == "ok"
    default = get("flash").hparam("block_k").default
    assert res["effective_hparams"] == {"block_q": 8, "block_k": default}
    assert json.loads(json.dumps(res["effective_hparams"])) == res["effective_hparams"]


class _DecidesPerCall:
    """A module whose None / "auto" hyperparameters are decided per call, as
    sparse_transformer's stride (stride_for(n)) and the sparse backends (backend_for)."""

    hp = {"stride": None, "backend": "auto", "window": 4, "mode": "auto", "c": None}

    def stride_for(self, n):
        return n // 16

    def backend_for(self, q, k, v, attn_mask=None):
        return f"on-{q.device.type}"

    def c_for(self, n):
        raise ValueError("cannot say")


def test_values_decided_per_call_are_shown_as_decided():
    q = torch.zeros(1, 1, 4, 2)
    got = resolved_hparams(_DecidesPerCall(), _DecidesPerCall.hp, 256, q, q, q)
    assert got == {"stride": 16, "backend": "on-cpu", "window": 4, "mode": "auto", "c": None}


def test_sparse_transformer_reports_the_stride_it_used():
    if get("sparse_transformer").hparam("stride").default is not None:
        pytest.skip("sparse_transformer's stride default is fixed in this tree")
    hp = {}
    for n in (256, 4096):
        mech = attnlab.create_for("sparse_transformer", head_dim=8, num_heads=1, max_seq_len=n)
        q = torch.zeros(1, 1, n, 8)
        hp[n] = resolved_hparams(mech, dict(mech.hp), n, q, q, q)
    assert all(isinstance(h["stride"], int) for h in hp.values())
    assert hp[256]["stride"] < hp[4096]["stride"]  # scaled with N
    assert hp[256]["backend"] == "blocked"  # "auto" on CPU, as decided


def test_context_keys_are_the_registry_s():
    assert CONTEXT_KEYS == CONTEXT_HPARAMS


def test_hparams_that_change_with_n_are_shown_per_length():
    built = {1024: {"stride": 32, "c": 8, "max_seq_len": 1024},
             4096: {"stride": 64, "c": 8, "max_seq_len": 4096}, 16384: None}
    assert describe_hparams(built) == "c=8, stride=32@1k/64@4k"
    assert describe_hparams({}, {"window": 256}) == "window=256 (not built)"
    assert describe_hparams({1024: {}}) == "-"


def test_the_bench_table_shows_each_row_s_hyperparameters(tmp_path, monkeypatch, capsys):
    from attnlab.cli.main import main as cli

    monkeypatch.setattr(mach, "matmul_roof_gflops", lambda *a, **k: 1e6)
    db = str(tmp_path / "h.db")
    args = ["bench", "--mechanisms", "sdpa", "flash", "sliding_window:window=4", "--n", "16",
            "--heads", "2", "--head-dim", "8", "--min-run-time", "0.01", "--threads", "1",
            "--no-progress", "--db", db]
    assert cli(args) == 0
    assert "roof 1000000 GFLOP/s (best of start 1000000, end 1000000)" in capsys.readouterr().out
    assert cli(["bench", "show", "1", "--markdown", "--db", db]) == 0
    md = capsys.readouterr().out.strip().splitlines()
    assert md[0].startswith("| mechanism | pass | hparams (as built) |")
    rows = {line.split(" | ")[0]: line.split(" | ")[2] for line in md[2:]}
    # Registry defaults the grid never named, as the built module had them:
    flash = get("flash")
    assert rows["| `flash`"] == (f"block_k={flash.hparam('block_k').default}, "
                                 f"block_q={flash.hparam('block_q').default}")
    assert "block_size=" in rows["| `sliding_window(window=4)`"]
    assert "window=4" in rows["| `sliding_window(window=4)`"]
    assert rows["| `sdpa`"] == "-"  # nothing to set
    with Store(db, readonly=True) as s:
        summary = summarise(s.measurements(1))
    table = render_table(summary)
    assert "hparams (as built)" in [c.header for c in table.columns]
    assert list(table.columns[2].cells) == [rows[f"| `{e['label']}`"] for e in summary]
    assert cli(["bench", "export", "1", "--format", "csv", "--db", db]) == 0
    exported = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    flash_row = next(r for r in exported if r["label"] == "flash")
    assert json.loads(flash_row["effective_hparams"]) == {
        h.name: h.default for h in flash.hparams}
    assert flash_row["flops_method"] == "analytic:softmax_attention"
