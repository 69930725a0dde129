"""The benchmark lab: grid validation, the SQLite store, the child-process harness
(statuses for a child that raises, hangs or allocates past its cap), resume after a
signal, analytic FLOP counts and the ``attnlab bench`` command line."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from attnlab.bench.grid import PROFILES, grid_from_file, make_grid
from attnlab.bench.runner import run_sweep
from attnlab.bench.store import SCHEMA_VERSION, Store, StoreError
from attnlab.cli.main import main as cli

FAST = {"min_run_time": 0.01, "timeout_s": 60.0, "threads": 1}


def tiny(**kw):
    return make_grid(**{"batch": [1], "heads": [2], "head_dim": [8], **FAST, **kw})


# ------------------------------------------------------------------------------- grid
def test_grid_is_the_product_of_its_axes_shortest_first():
    g = tiny(mechanisms=["sdpa", {"name": "sliding_window", "window": 4}], lengths=[64, 16],
             passes=["fwd", "fwd+bwd"], causal=[False, True], dtypes=["float32", "float64"])
    pts = g.points()
    assert len(pts) == 2 * 2 * 2 * 2 * 2
    assert len({p.key for p in pts}) == len(pts)
    assert [p.N for p in pts[:2]] == [16, 64]
    assert {p.label for p in pts} == {"sdpa", "sliding_window(window=4)"}


def test_profiles_exist_and_validate():
    for name in PROFILES:
        assert make_grid(profile=name).points()


@pytest.mark.parametrize("kw,pattern", [
    (dict(mechanisms=["sdpaa"], lengths=[8]), r"unknown name 'sdpaa'; did you mean 'sdpa'"),
    (dict(mechanisms=[], lengths=[8]), r"mechanisms must be a non-empty list"),
    (dict(mechanisms=["sdpa"], lengths=[]), r"lengths must be a non-empty list of ints; got \[\]"),
    (dict(mechanisms=["sdpa"], lengths=[0]), r"lengths must hold ints >= 1; got 0"),
    (dict(mechanisms=["sdpa"], lengths=["8"]), r"lengths must hold ints >= 1; got '8'"),
    (dict(mechanisms=["sdpa"], lengths=[8], dtypes=["float33"]),
     r"dtypes must be among .* got 'float33' \(did you mean 'float32'"),
    (dict(mechanisms=["sdpa"], lengths=[8], passes=["bwd"]), r"passes must be among"),
    (dict(mechanisms=["sdpa"], lengths=[8], min_run_time=0), r"min_run_time must be a number > 0"),
    (dict(mechanisms=["sdpa"], lengths=[8], lenghts=[8]), r"unknown setting 'lenghts' \(did you "
                                                          r"mean 'lengths'\?\)"),
    (dict(mechanisms=[{"name": "sliding_window", "windw": 4}], lengths=[8]),
     r"sliding_window: unknown hyperparameter 'windw' \(did you mean 'window'\?\)"),
    (dict(mechanisms=["sdpa"]), r"no sequence lengths"),
])
def test_bad_grids_are_refused_with_the_reason(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_grid(**kw)


def test_unknown_profile_suggests_the_close_one():
    with pytest.raises(ValueError, match=r"unknown profile 'quik' \(did you mean 'quick'\?\)"):
        make_grid(profile="quik")


def test_sweep_files_toml_and_yaml(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('lengths = [16, 32]\nheads = [2]\nmechanisms = ["sdpa", '
                    '{name = "local", block_size = 8}]\n')
    g = grid_from_file(toml)
    assert [m.label for m in g.mechanisms] == ["sdpa", "local(block_size=8)"]
    assert g.lengths == (16, 32)
    pytest.importorskip("yaml")
    yml = tmp_path / "s.yaml"
    yml.write_text("profile: quick\nmechanisms: [sdpa]\nlengths: [8]\n")
    assert grid_from_file(yml).lengths == (8,)


@pytest.mark.parametrize("name,text,pattern", [
    ("missing.toml", None, r"sweep file .*missing.toml: cannot read it"),
    ("bad.toml", "lengths = [1, \n", r"malformed TOML"),
    ("bad.json", "{}", r"expected a .toml, .yaml or .yml file; got suffix '.json'"),
    ("empty.toml", "", r"expected a table of settings"),
    ("bad.toml", 'lengths = [8]\nmechanisms = ["nope"]\n', r"unknown name 'nope'"),
])
def test_bad_sweep_files(tmp_path, name, text, pattern):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=pattern):
        grid_from_file(path)


# ------------------------------------------------------------------------------ store
def test_a_database_from_a_newer_schema_is_refused_and_untouched(tmp_path):
    db = tmp_path / "new.db"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.execute("CREATE TABLE runs (x)")
    con.commit()
    con.close()
    before = db.read_bytes()
    with pytest.raises(StoreError, match=rf"newer attnlab \(schema v{SCHEMA_VERSION + 1}; this "
                                         rf"version reads up to v{SCHEMA_VERSION}\)"):
        Store(db)
    assert db.read_bytes() == before


def test_a_v1_database_gains_the_trainings_table_and_keeps_its_runs(tmp_path):
    from test_bench_flops import V2_MEASUREMENTS  # v1 = v2 without the trainings table

    db = tmp_path / "v1.db"
    con = sqlite3.connect(db)
    v1 = V2_MEASUREMENTS.split("CREATE TABLE trainings")[0]  # runs + measurements
    con.executescript(v1)
    con.execute("INSERT INTO runs (started_at, status, grid, grid_digest, machine, fingerprint,"
                " versions, points_total) VALUES ('t', 'done', '{}', 'd', '{}', 'f', '{}', 0)")
    con.execute("PRAGMA user_version=1")
    con.commit()
    con.close()
    with Store(db) as s:
        assert [r["id"] for r in s.runs()] == [1]
        assert s.trainings() == [] and s.generations() == []  # v2's and v4's tables added
        assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        cols = {r[1] for r in s.db.execute("PRAGMA table_info(measurements)")}
        assert {"flops_method", "effective_hparams"} <= cols  # v3's, added to the old table


@pytest.mark.parametrize("content", [b"not a database at all" * 100, None])
def test_foreign_files_are_refused_and_untouched(tmp_path, content):
    db = tmp_path / "x.db"
    if content is None:  # an SQLite database of something else
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE people (name)")
        con.commit()
        con.close()
    else:
        db.write_bytes(content)
    before = db.read_bytes()
    with pytest.raises(StoreError, match=r"not (an SQLite database|attnlab's)"):
        Store(db)
    assert db.read_bytes() == before


def test_unknown_run_ids(tmp_path):
    with Store(tmp_path / "r.db") as s:
        with pytest.raises(StoreError, match=r"holds no runs yet"):
            s.resolve("latest")
        with pytest.raises(StoreError, match=r"run id must be an integer or 'latest'; got 'x'"):
            s.resolve("x")


# ---------------------------------------------------------------------------- harness
def test_tiny_sweep_rows_flops_and_statuses(tmp_path):
    g = tiny(mechanisms=["reference", "sdpa", "linformer"], lengths=[16, 32],
             passes=["fwd", "fwd+bwd"], causal=[False, True])
    with Store(tmp_path / "b.db") as s:
        rid = run_sweep(g, s, progress=False)
        rows = s.measurements(rid)
        assert s.run(rid)["status"] == "done"
    assert len(rows) == len(g.points()) == 24
    by = {(r["mechanism"], r["N"], r["pass_"], r["causal"]): r for r in rows}
    for (name, n, p, causal), r in by.items():
        if name == "linformer" and causal:  # no causal form: recorded, not run
            assert r["status"] == "unsupported" and r["time_s"] is None
            continue
        assert r["status"] == "ok", r
        assert r["time_s"] > 0 and r["time_iqr_s"] >= 0 and r["peak_mem_bytes"] >= 0
        assert r["gate_error"] <= r["gate_tol"]
        if name in ("reference", "sdpa"):
            # Q K^T and P V: 2 D FLOPs per (query, key) pair each -> 4 B H N^2 D forward;
            # causal: only the N (N + 1) / 2 allowed pairs; backward = 2 x forward.
            pairs = n * (n + 1) // 2 if causal else n * n
            assert r["flops"] == 4 * 1 * 2 * pairs * 8 * (3 if p == "fwd+bwd" else 1)
            assert r["flops_method"] == "analytic:softmax_attention"
            assert r["error"] < 1e-5
        else:
            assert r["flops_method"] == "FlopCounterMode"
        assert r["gflops_per_s"] == pytest.approx(r["flops"] / r["time_s"] / 1e9)


def test_failing_children_are_recorded_and_the_sweep_goes_on(tmp_path):
    g = tiny(mechanisms=["sdpa", "reference", "scaled_dot", "dot"], lengths=[16, 32],
             timeout_s=5.0, mem_cap_gib=6.0)
    hook = {"sdpa@16": "raise", "reference@16": "hang", "scaled_dot@16": "allocate",
            "dot@16": "die", "bytes": 32 << 30}
    with Store(tmp_path / "f.db") as s:
        rid = run_sweep(g, s, progress=False, test_hook=hook)
        rows = {(r["mechanism"], r["N"]): r for r in s.measurements(rid)}
    assert rows[("sdpa", 16)]["status"] == "error"
    assert "deliberate failure" in rows[("sdpa", 16)]["message"]
    assert rows[("sdpa", 32)]["status"] == "ok"  # an error does not stop the series
    assert rows[("reference", 16)]["status"] == "timeout"
    assert rows[("reference", 32)]["status"] == "skipped"  # longer: would time out too
    assert rows[("scaled_dot", 16)]["status"] == "oom"
    assert "MemoryError" in rows[("scaled_dot", 16)]["message"]
    assert rows[("dot", 16)]["status"] == "oom"  # SIGKILL, as from the kernel's OOM killer
    for r in rows.values():
        if r["status"] != "ok":
            assert r["time_s"] is None and r["flops"] is None and r["error"] is None


def test_a_mechanism_failing_its_gate_is_never_timed(tmp_path):
    # The hook breaks `linear` (adds 0.1 to its output) inside the first child only: the
    # gate must catch it, and no later point of it may run or report a time.
    g = tiny(mechanisms=["sdpa", "linear"], lengths=[16, 32])
    with Store(tmp_path / "g.db") as s:
        rid = run_sweep(g, s, progress=False, test_hook={"linear@16": "break_gate"})
        rows = {(r["mechanism"], r["N"]): r for r in s.measurements(rid)}
    for n in (16, 32):
        assert rows[("linear", n)]["status"] == "FAILED"
        assert rows[("linear", n)]["time_s"] is None
        assert rows[("sdpa", n)]["status"] == "ok"


SWEEP_SCRIPT = textwrap.dedent("""
    import sys
    from attnlab.bench.grid import make_grid
    from attnlab.bench.runner import run_sweep
    from attnlab.bench.store import Store

    def main():
        g = make_grid(mechanisms=["sdpa", "reference"], lengths=[8, 16, 24], batch=[1],
                      heads=[1], head_dim=[4], min_run_time=0.01, threads=1)
        hook = {"reference@16": "hang"} if sys.argv[2] == "hang" else None
        with Store(sys.argv[1]) as s:
            try:
                run_sweep(g, s, progress=False, test_hook=hook)
            except KeyboardInterrupt:
                sys.exit(130)

    if __name__ == "__main__":
        main()
""")


def test_resume_after_a_signal_skips_done_points_and_never_double_counts(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP_SCRIPT)
    db = tmp_path / "resume.db"
    proc = subprocess.Popen([sys.executable, str(script), str(db), "hang"])
    deadline = time.time() + 120
    n_done = 0
    while time.time() < deadline and n_done < 4:  # 3 sdpa + reference@8, then the hang
        time.sleep(0.5)
        if db.exists():
            try:
                with sqlite3.connect(db) as con:
                    n_done = con.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
            except sqlite3.OperationalError:
                pass
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 130
    with Store(db) as s:
        assert s.run(1)["status"] == "interrupted"
        assert len(s.measurements(1)) == 4
    # Started again: the same run continues; the hung point is measured this time.
    assert subprocess.run([sys.executable, str(script), str(db), "ok"], timeout=300).returncode == 0
    clean = tmp_path / "clean.db"
    subprocess.run([sys.executable, str(script), str(clean), "ok"], timeout=300, check=True)
    with Store(db) as s, Store(clean) as c:
        assert [r["id"] for r in s.runs()] == [1]
        resumed, fresh = s.measurements(1), c.measurements(1)
        assert s.run(1)["status"] == "done"
    assert len(resumed) == len(fresh) == 6
    assert sorted(r["point_key"] for r in resumed) == sorted(r["point_key"] for r in fresh)
    assert all(r["status"] == "ok" for r in resumed)


# -------------------------------------------------------------------------------- CLI
def test_cli_run_show_export_compare(tmp_path, capsys):
    db = str(tmp_path / "cli.db")
    args = ["bench", "--mechanisms", "sdpa", "sliding_window:window=4", "--n", "16", "32",
            "--heads", "2", "--head-dim", "8", "--min-run-time", "0.01", "--threads", "1",
            "--no-progress", "--db", db]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "sliding_window(window=4)" in out and "sdpa" in out
    assert cli([*args, "--new"]) == 0
    capsys.readouterr()
    assert cli(["bench", "runs", "--db", db]) == 0
    assert "2/4" not in capsys.readouterr().out
    assert cli(["bench", "export", "1", "--format", "json", "--db", db]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    csv_path = tmp_path / "m.csv"
    assert cli(["bench", "export", "latest", "--out", str(csv_path), "--db", db]) == 0
    assert csv_path.read_text().count("\n") == 5
    assert cli(["bench", "compare", "1", "2", "--db", db]) == 0
    assert "sliding_window(window=4)" in capsys.readouterr().out
    assert cli(["bench", "show", "1", "--markdown", "--db", db]) == 0
    md = capsys.readouterr().out.strip().splitlines()
    assert md[0].startswith("| mechanism | pass |") and len(md) == 2 + 2  # header + 2 rows
    assert any(line.startswith("| `sliding_window(window=4)` | fwd |") for line in md)


@pytest.mark.parametrize("args,pattern", [
    (["bench", "--mechanisms", "sdpaa", "--n", "8"], r"did you mean 'sdpa'"),
    (["bench", "--profile", "quik"], r"did you mean 'quick'"),
    (["bench", "--mechanisms", "sdpa", "--n", "8", "--sweep", "nope.toml"], r"cannot read it"),
])
def test_cli_bad_input_exits_2_without_creating_the_database(tmp_path, capsys, args, pattern):
    import re

    db = tmp_path / "never.db"
    assert cli([*args, "--db", str(db)]) == 2
    assert re.search(pattern, capsys.readouterr().err)
    assert not db.exists()


def test_cli_refuses_a_newer_database_untouched(tmp_path, capsys):
    db = tmp_path / "newer.db"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 5}")
    con.commit()
    con.close()
    before = db.read_bytes()
    assert cli(["bench", "--mechanisms", "sdpa", "--n", "8", "--db", str(db)]) == 2
    assert "newer attnlab" in capsys.readouterr().err
    assert db.read_bytes() == before
    assert os.path.getsize(db) == len(before)


def test_a_point_predicted_to_time_out_is_skipped_not_run():
    from attnlab.bench.runner import _predicted_wall

    assert _predicted_wall([], 4096) == 0.0 and _predicted_wall([(1024, 2.0)], 4096) == 0.0
    # 1K -> 2K took 4x (quadratic): 4K is predicted at 8 s * 4 = 32 s.
    assert _predicted_wall([(1024, 2.0), (2048, 8.0)], 4096) == pytest.approx(32.0)
    # Faster than linear growth is extrapolated linearly (exponent at least 1).
    assert _predicted_wall([(1024, 2.0), (2048, 2.0)], 8192) == pytest.approx(8.0)


def test_all_and_approximate_expand_inside_a_list():
    import attnlab

    g = tiny(mechanisms=["approximate", "sdpa"], lengths=[8])
    assert [m.name for m in g.mechanisms] == [*attnlab.list_mechanisms(exact=False), "sdpa"]
