"""The results database in hostile surroundings: corrupt, read-only, unreachable or shared
by two processes, and bench grids whose hyperparameters are invalid. Every command must
end in one clear line naming the file (or argument) and never write into a database it
refused."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hostile import assert_one_clear_line, corrupt_database, read_only, run_cli

from attnlab.bench.store import Store, StoreError
from attnlab.cli.main import main as cli

MACHINE = {"cpu": "test cpu", "cores": 2, "ram_gib": 4.0, "gpu": None, "roof_gflops": 100.0}
VERSIONS = {"python": "3", "torch": "2", "attnlab": "0"}
TINY = ["--heads", "1", "--head-dim", "4", "--batch", "1", "--min-run-time", "0.01",
        "--threads", "1", "--no-progress"]


def _point(mechanism: str, n: int, time_s: float) -> dict:
    return {"mechanism": mechanism, "label": mechanism, "hparams": {}, "N": n, "batch": 1,
            "heads": 1, "head_dim": 4, "dtype": "float32", "pass_": "fwd", "causal": False,
            "device": "cpu", "status": "ok", "time_s": time_s, "time_iqr_s": 0.0, "runs": 3,
            "peak_mem_bytes": 1000 * n, "flops": 16.0 * n * n, "error": 0.0, "wall_s": 0.1}


def good_database(path: Path) -> Path:
    """A results database with one finished run of two mechanisms at two lengths (written
    directly: no sweep, no torch)."""
    with Store(path) as s:
        rid = s.new_run(grid={"mechanisms": []}, digest="d", machine=MACHINE, fingerprint="f",
                        versions=VERSIONS, commit=None, command="test", profile=None,
                        points_total=4)
        for m, t in (("sdpa", 1e-4), ("reference", 2e-4)):
            for n in (16, 32):
                s.add(rid, f"{m}|{n}", _point(m, n, t * n))
        s.set_status(rid, "done")
    return path


def hidden_corruption(path: Path) -> Path:
    """A results database whose ``trainings`` b-tree, which ``attnlab bench`` never reads,
    has a broken root page: every bench command works on it as if it were sound; only an
    integrity check sees it (the audit's "fails PRAGMA integrity_check, and bench run
    appends to it")."""
    good_database(path)
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=DELETE")
    with con:
        for i in range(40):  # several pages: the root becomes an interior page
            con.execute("INSERT INTO trainings (run_dir, task, model, mechanism, seed, status,"
                        " steps, train_time_s, metric, mode, summary, config, versions,"
                        " machine, finished_at) VALUES (?, 't', 'm', 'sdpa', 0, 'done', 1, 1.0,"
                        " 'acc', 'max', ?, '{}', '{}', '{}', 't')", (f"run-{i}", "x" * 500))
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name='trainings'").fetchone()[0]
    page = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    data = bytearray(path.read_bytes())
    data[(root - 1) * page] = 0x42  # the page's type byte: no b-tree page has this type
    path.write_bytes(bytes(data))
    con = sqlite3.connect(path)
    try:
        assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1  # reads fine
        with pytest.raises(sqlite3.DatabaseError, match="malformed"):
            con.execute("PRAGMA quick_check").fetchall()
    finally:
        con.close()
    return path


# --------------------------------------------------------------------------- store units
def test_a_point_stored_twice_is_kept_once_and_does_not_raise(tmp_path):
    with Store(tmp_path / "b.db") as s:
        rid = s.new_run(grid={}, digest="d", machine=MACHINE, fingerprint="f",
                        versions=VERSIONS, commit=None, command="", profile=None,
                        points_total=1)
        s.add(rid, "k", _point("sdpa", 16, 1.0))
        s.add(rid, "k", _point("sdpa", 16, 2.0))  # e.g. a second writer measured it too
        rows = s.measurements(rid)
    assert [(r["point_key"], r["time_s"]) for r in rows] == [("k", 1.0)]


@pytest.mark.parametrize("corrupt", [corrupt_database, hidden_corruption],
                         ids=["every-page", "hidden"])
def test_a_corrupt_database_is_refused_for_writing_and_left_unchanged(tmp_path, corrupt):
    db = corrupt(tmp_path / "c.db")
    before = db.read_bytes()
    with pytest.raises(StoreError, match=rf"{re.escape(str(db))} is corrupt \(quick_check: "
                                         rf".+\); it was not modified; move it aside or pass "
                                         rf"another --db"):
        Store(db)
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.db"]


def test_sqlite_errors_inside_store_methods_name_the_file(tmp_path):
    db = corrupt_database(tmp_path / "c.db")
    with Store(db, readonly=True) as s:  # the header is intact: opening works
        with pytest.raises(StoreError, match=rf"{re.escape(str(db))} is corrupt \(.*malformed"):
            s.runs()



# ------------------------------------------------------------------------- command line
READS = [["runs"], ["show", "1"], ["export", "1", "--format", "json"], ["compare", "1", "1"],
         ["plot", "1", "--out", "plots"]]  # plots/ under the child's cwd: never created
RUN = ["bench", "run", "--mechanisms", "sdpa", "--n", "8", *TINY]


def fails(res: dict, *needles: str) -> str:
    """A user error (exit 2) ending in one clear line that holds every needle."""
    line = assert_one_clear_line(res, *needles)
    assert res["code"] == 2, f"{res['argv']} exited {res['code']}: {line}"
    return line


def _files(d: Path) -> dict[str, Path]:
    """The surroundings: databases corrupt, hidden-corrupt, read-only (file, directory),
    unreadable, good; a plain file, a read-only directory, a sweep file with window=-1."""
    f = {"corrupt": corrupt_database(d / "corrupt.db"), "hidden": hidden_corruption(
        d / "hidden.db"), "ro file": good_database(d / "ro-file.db"), "ro dir": d / "ro-dir",
        "good": good_database(d / "good.db"), "unreadable": good_database(d / "unread.db"),
        "a file": d / "a-file", "sweep": d / "bad-window.toml"}
    f["ro file"].chmod(0o444)
    f["ro dir"].mkdir()
    f["in ro dir"] = good_database(f["ro dir"] / "g.db")
    read_only(f["ro dir"])
    f["unreadable"].chmod(0)
    f["a file"].write_text("not a directory\n")
    f["sweep"].write_text('lengths = [16]\nmechanisms = [{name = "sliding_window", '
                          'window = -1}]\n')
    return f


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every command line below, run in ONE unprivileged child (one torch import): the
    files, their bytes before, and each case's result by name."""
    d = tmp_path_factory.mktemp("hostile-bench")
    f = _files(d)
    before = {k: f[k].read_bytes() for k in ("corrupt", "hidden", "ro file", "in ro dir")}
    db = {k: str(p) for k, p in f.items()}
    cases = {f"corrupt {r[0]}": ["bench", *r, "--db", db["corrupt"]] for r in READS}
    for name in ("corrupt", "hidden", "ro file", "in ro dir", "unreadable"):
        cases[f"run {name}"] = [*RUN, "--db", db[name]]
    for name in ("ro file", "in ro dir"):
        cases.update({f"{name} {r[0]}": ["bench", *r, "--db", db[name]] for r in READS[:3]})
    cases["unreadable runs"] = ["bench", "runs", "--db", db["unreadable"]]
    cases["db under a file"] = [*RUN, "--db", str(f["a file"] / "b.db")]
    cases["new db in ro dir"] = [*RUN, "--db", str(f["ro dir"] / "new.db")]
    cases["db is a dir"] = [*RUN, "--db", str(d)]
    cases["plot into ro dir"] = ["bench", "plot", "1", "--out", db["ro dir"], "--db", db["good"]]
    cases["export into ro dir"] = ["bench", "export", "1", "--out", str(f["ro dir"] / "x.csv"),
                                   "--db", db["good"]]
    cases["window in file"] = ["bench", "run", "--sweep", db["sweep"], *TINY,
                               "--db", str(d / "never-file.db")]
    cases["window in flag"] = ["bench", "run", "--mechanisms", "sliding_window:window=-1",
                               "--n", "16", *TINY, "--db", str(d / "never-flag.db")]
    res = dict(zip(cases, run_cli(list(cases.values()), cwd=d), strict=True))
    return {"dir": d, "files": f, "before": before, "res": res}


def test_corrupt_pages_are_named_by_every_reading_command(world):
    db = world["files"]["corrupt"]
    for r in READS:
        fails(world["res"][f"corrupt {r[0]}"], f"{db} is corrupt (", "malformed")
    assert not (world["dir"] / "plots").exists()


def test_bench_run_refuses_a_corrupt_database_and_leaves_its_bytes(world):
    for name in ("corrupt", "hidden"):  # hidden: every query works, quick_check does not
        fails(world["res"][f"run {name}"], f"{world['files'][name]} is corrupt (quick_check: ",
              "it was not modified", "move it aside or pass another --db")
        assert world["files"][name].read_bytes() == world["before"][name]


def test_a_read_only_database_is_read_and_refused_for_writing(world):
    for name in ("ro file", "in ro dir"):
        res, db = world["res"], world["files"][name]
        for r in READS[:3]:
            assert res[f"{name} {r[0]}"]["code"] == 0, res[f"{name} {r[0]}"]
        assert "test" in res[f"{name} runs"]["out"]  # the stored run's command
        assert {"sdpa", "reference"} <= set(res[f"{name} show"]["out"].split())
        assert len(json.loads(res[f"{name} export"]["out"])) == 4
        fails(res[f"run {name}"], f"{db} is read-only", "cannot store results in it",
              "pass another --db")
        assert db.read_bytes() == world["before"][name]


def test_unusable_db_paths_are_named_with_the_problem(world):
    res, f, d = world["res"], world["files"], world["dir"]
    for case in ("unreadable runs", "run unreadable"):
        fails(res[case], f"{f['unreadable']} is not readable (permission denied)")
    fails(res["db under a file"], str(f["a file"] / "b.db"),
          f"{f['a file']} is a file, not a directory")
    fails(res["new db in ro dir"], str(f["ro dir"] / "new.db"),
          f"directory {f['ro dir']} is not writable")
    fails(res["db is a dir"], f"{d} is a directory", "--db")
    assert f["a file"].read_text() == "not a directory\n"


def test_outputs_into_a_read_only_directory_are_named(world):
    res, ro = world["res"], world["files"]["ro dir"]
    fails(res["plot into ro dir"], f"{ro}: cannot write the plots there",
          "Permission denied", "pass another --out")
    fails(res["export into ro dir"], f"{ro / 'x.csv'}: cannot write the export there "
                                     f"(Permission denied)", "pass another --out")
    assert sorted(os.listdir(ro)) == ["g.db"]


def test_invalid_hyperparameters_in_a_sweep_file_or_a_flag_exit_2_before_any_database(world):
    res, d = world["res"], world["dir"]
    fails(res["window in file"], f"sweep file {world['files']['sweep']}",
          "sliding_window: hyperparameter 'window' must be >= 1; got -1")
    fails(res["window in flag"], "sliding_window: hyperparameter 'window' must be >= 1; got -1")
    assert not (d / "never-file.db").exists() and not (d / "never-flag.db").exists()


def test_export_replaces_the_file_whole(tmp_path):
    db = good_database(tmp_path / "g.db")
    out = tmp_path / "m.csv"
    old = "an older export\n" * 1000
    out.write_text(old)
    with open(out) as reader:  # a reader of the old export (a notebook, a dashboard)
        assert cli(["bench", "export", "1", "--out", str(out), "--db", str(db)]) == 0
        assert reader.read() == old  # it never sees the file truncated or half written
    assert out.read_text().splitlines()[0].startswith("id,run_id,point_key,")
    assert len(out.read_text().splitlines()) == 1 + 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.db", "m.csv"]  # no temp file


# ----------------------------------------------------------------- two writers, one run
SWEEP = textwrap.dedent("""
    import sys
    from attnlab.bench.grid import make_grid
    from attnlab.bench.runner import run_sweep
    from attnlab.bench.store import Store

    if __name__ == "__main__":  # the forkserver's children import this file too
        g = make_grid(mechanisms=["sdpa", "reference"], lengths=[8, 16], batch=[1],
                      heads=[1], head_dim=[4], min_run_time=0.01, threads=1)
        with Store(sys.argv[1]) as s:
            run_sweep(g, s, progress=False, test_hook={"reference@16": "hang"})
""")
SAME_GRID = ["bench", "run", "--mechanisms", "sdpa", "reference", "--n", "8", "16", *TINY]


def _count(db: Path, sql: str) -> int:
    try:
        with sqlite3.connect(db) as con:
            return con.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return -1


def test_a_second_process_is_refused_a_run_being_measured_until_the_first_dies(tmp_path):
    script, db = tmp_path / "sweep.py", tmp_path / "two.db"
    script.write_text(SWEEP)
    # The first sweep stores 3 points, then hangs in reference@16: it holds run 1.
    first = subprocess.Popen([sys.executable, str(script), str(db)], start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and _count(db, "SELECT COUNT(*) FROM measurements") < 3:
            assert first.poll() is None, "the first sweep ended early"
            time.sleep(0.3)
        assert _count(db, "SELECT COUNT(*) FROM measurements") == 3
        second, = run_cli([[*SAME_GRID, "--db", str(db)]], cwd=tmp_path, timeout=120)
        fails(second, f"run 1 in {db} is being measured by another process (pid {first.pid}, "
                      f"started ", "wait for it to finish, or pass --new")
        assert _count(db, "SELECT COUNT(*) FROM measurements") == 3
        assert _count(db, "SELECT COUNT(*) FROM runs") == 1
    finally:  # kill -9 the sweep with its forkserver and the hanging child
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    # Its lock died with it: the run is resumed and finished, each point stored once.
    third, = run_cli([[*SAME_GRID, "--db", str(db)]], cwd=tmp_path, timeout=180)
    assert third["code"] == 0, third
    with Store(db, readonly=True) as s:
        assert [(r["id"], r["status"]) for r in s.runs()] == [(1, "done")]
        rows = s.measurements(1)
    assert sorted(r["point_key"] for r in rows) == sorted(
        f"{m}|N={n}|B=1|H=1|D=4|float32|fwd|full|cpu" for m in ("sdpa", "reference")
        for n in (8, 16))
    assert all(r["status"] == "ok" for r in rows)
