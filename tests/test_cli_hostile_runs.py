"""The run-writing commands in hostile surroundings: read-only output directories,
unreadable and corrupt databases, empty and truncated checkpoints, malformed run files.

Each command line must end with one ``error:`` line that names the file or directory and
what is wrong, a non-zero exit, no traceback, no half-written file left behind, and (where
the problem can be seen up front) no training or benchmark before the error.

Every hostile command line runs in ONE unprivileged child process (tests/hostile.py: root
in CI would otherwise write into read-only directories); the runs they start from are
trained once, tiny, in this process.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hostile import assert_one_clear_line, corrupt_database, read_only, run_cli

from attnlab.cli.main import main

pytest.importorskip("matplotlib")

TINY_MODEL = ["--model-opt", "d_model=16", "--model-opt", "num_heads=2",
              "--model-opt", "num_layers=1", "--set", "eval_every=2"]
TRAIN = ["train", "--task", "copy", "--max-steps", "2", "--no-progress",
         "--task-opt", "n_train=64", "--task-opt", "n_validation=16", "--task-opt", "n_test=16",
         "--task-opt", "length=4", *TINY_MODEL]
# The smallest compare the command line makes: one mechanism, one seed, two steps (its
# benchmark is the quick profile's three lengths of sdpa: a few seconds).
COMPARE = ["compare", "--task", "listops", "--mechanisms", "sdpa", "--seeds", "0", "--max-steps", "2",
           "--jobs", "1", "--no-progress"]
# SQLite's word for it, or the results store's
CORRUPT = ("malformed", "corrupt")


def _main(*argv) -> int:
    return main([str(a) for a in argv])


def _refused(d: Path) -> str:
    """What the error line says of a directory that takes no files."""
    return f"cannot write to {d}:"


def _listing(d: Path) -> list[tuple]:
    """Every file under ``d`` with its size and modification time: a read-only directory
    must come out of a command exactly as it went in."""
    return sorted((str(p.relative_to(d)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in d.rglob("*") if p.is_file())


class World:
    """The starting runs, the hostile variants and, once run, each case's result."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.cases: dict[str, tuple[list[str], tuple]] = {}
        self.results: dict[str, dict] = {}
        self.frozen: dict[Path, list[tuple]] = {}  # read-only directories and their files

    def case(self, name: str, argv: list, *needles) -> None:
        """``needles``: what the error line must hold; a tuple: one of its strings."""
        self.cases[name] = ([str(a) for a in argv], needles)

    def copy(self, src: Path, name: str) -> Path:
        return Path(shutil.copytree(src, self.base / "cases" / name))

    def read_only(self, d: Path) -> Path:
        read_only(d)
        self.frozen[d] = _listing(d)
        return d

    def check(self, *prefixes: str) -> None:
        """Every case whose name starts with one of ``prefixes`` ended in one clear line
        holding its needles; all failures are listed, not just the first."""
        names = [n for n in self.cases if n.startswith(prefixes)]
        assert names, prefixes
        failures = []
        for n in names:
            needles = self.cases[n][1]
            try:
                line = assert_one_clear_line(self.results[n],
                                             *(str(x) for x in needles if not isinstance(x, tuple)))
                for any_of in (x for x in needles if isinstance(x, tuple)):
                    assert any(x in line for x in any_of), f"none of {any_of} in {line!r}"
            except AssertionError as e:
                failures.append(f"[{n}] {e}")
        assert not failures, "\n\n".join(failures)


def _starting_runs(w: World) -> tuple[Path, Path, Path]:
    copy_run = w.base / "copy"
    assert _main(*TRAIN, "--run-dir", copy_run) == 0
    inpaint_run = w.base / "inpaint"
    assert _main("train", "--task", "inpaint_digits", "--max-steps", "2", "--no-progress",
                 "--task-opt", "n_train=64", "--set", "batch_size=16",
                 "--set", "eval_batches=1", *TINY_MODEL, "--run-dir", inpaint_run) == 0
    compare_run = w.base / "cmp"
    assert _main(*COMPARE, "--out", compare_run) == 0
    return copy_run / "seed-0", inpaint_run / "seed-0", compare_run


def _read_only_cases(w: World, inp: Path, cmp: Path) -> None:
    ro = w.read_only(w.base / "ro")
    w.case("ro_train_run_dir", [*TRAIN, "--run-dir", ro], _refused(ro))
    w.case("ro_train_run_dir_parent", [*TRAIN, "--run-dir", ro / "new" / "run"],
           _refused(ro))
    w.case("ro_train_db", [*TRAIN, "--run-dir", w.base / "never-trained-1", "--db",
                           ro / "r.db"], "--db", _refused(ro))
    db_dir = w.base / "ro-db"
    db_dir.mkdir()
    assert _main(*TRAIN, "--run-dir", w.base / "with-db", "--db", db_dir / "r.db") == 0
    w.read_only(db_dir)  # an existing database: SQLite needs its directory for the journal
    w.case("ro_train_db_existing", [*TRAIN, "--run-dir", w.base / "never-trained-2", "--db",
                                    db_dir / "r.db"], "--db", _refused(db_dir))
    w.case("ro_compare_out", [*COMPARE, "--out", w.read_only(w.base / "ro-cmp")],
           "--out", _refused(w.base / "ro-cmp"))
    w.case("ro_compare_out_parent", [*COMPARE, "--out", ro / "cmp"], _refused(ro))
    finished = w.read_only(w.copy(cmp, "ro-compare-rerun"))
    w.case("ro_compare_rerun", [*COMPARE, "--out", finished], _refused(finished))
    w.case("ro_report_out", ["report", cmp, "--out", ro], _refused(ro))
    rep = w.copy(cmp, "ro-report-default")
    w.read_only(rep / "report")
    w.case("ro_report_default_out", ["report", rep], _refused(rep / "report"))
    w.case("ro_show_attention_out", ["show-attention", "--checkpoint", cmp / "train" / "sdpa" /
                                     "seed-0", "--text", "[MAX 1 2 ]", "--out", ro / "a.png"],
           "--out", _refused(ro))
    w.case("ro_inpaint_out", ["inpaint", inp, "--n", "2", "--out", ro / "i.png"],
           "--out", _refused(ro))
    ro_seed = w.read_only(w.copy(inp, "ro-inpaint-default"))
    w.case("ro_inpaint_default_out", ["inpaint", ro_seed, "--n", "2"], _refused(ro_seed))


def _database_cases(w: World, cmp: Path) -> None:
    for name, how in (("unreadable", lambda p: p.chmod(0)),
                      ("corrupt", lambda p: (p.unlink(), corrupt_database(p)))):
        for cmd in ("report", "compare"):
            d = w.copy(cmp, f"db-{name}-{cmd}")
            how(d / "results.db")
            argv = ["report", d] if cmd == "report" else [*COMPARE, "--out", d]
            w.case(f"db_{name}_{cmd}", argv, d / "results.db",
                   "permission denied" if name == "unreadable" else CORRUPT)
        db = w.base / f"train-{name}.db"
        shutil.copy(cmp / "results.db", db)
        how(db)
        w.case(f"db_{name}_train", [*TRAIN, "--run-dir", w.base / f"never-trained-{name}",
                                    "--db", db], db,
               "permission denied" if name == "unreadable" else CORRUPT)


def _checkpoint_cases(w: World, seed: Path, inp: Path, cmp: Path) -> None:
    for name, size in (("empty", 0), ("truncated", None)):
        run = w.copy(seed.parent, f"resume-{name}")
        ckpt = run / "seed-0" / "checkpoint.pt"
        (run / "seed-0" / "summary.json").unlink()  # an unfinished seed: --resume loads it
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[:len(data) // 2 if size is None else size])
        w.case(f"ckpt_{name}_resume", [*TRAIN, "--run-dir", run, "--resume"],
               f"checkpoint {ckpt} is empty or truncated (" + ("0 bytes)" if size == 0 else ""))
    gen = w.copy(seed, "ckpt-generate")
    (gen / "best.pt").write_bytes(b"")
    w.case("ckpt_empty_generate", ["generate", gen],
           f"checkpoint {gen / 'best.pt'} is empty or truncated (0 bytes)")
    inpaint = w.copy(inp, "ckpt-inpaint")
    (inpaint / "best.pt").write_bytes(b"")
    w.case("ckpt_empty_inpaint", ["inpaint", inpaint, "--n", "2"],
           f"checkpoint {inpaint / 'best.pt'} is empty or truncated (0 bytes)")
    shown = w.copy(cmp / "train" / "sdpa" / "seed-0", "ckpt-show")
    (shown / "best.pt").write_bytes(b"")
    w.case("ckpt_empty_show_attention", ["show-attention", "--checkpoint", shown, "--text",
                                         "[MAX 1 2 ]"],
           f"checkpoint {shown / 'best.pt'} is empty or truncated (0 bytes)")
    rep = w.copy(cmp, "ckpt-report")
    (rep / "train" / "sdpa" / "seed-0" / "best.pt").write_bytes(b"")
    w.case("ckpt_empty_report", ["report", rep], rep / "train" / "sdpa" / "seed-0" / "best.pt",
           "empty or truncated (0 bytes)")
    again = w.copy(cmp, "ckpt-compare")
    s0 = again / "train" / "sdpa" / "seed-0"
    (s0 / "summary.json").unlink()  # the rerun continues the seed from its checkpoint
    (s0 / "checkpoint.pt").write_bytes(b"")
    w.case("ckpt_empty_compare", [*COMPARE, "--out", again],
           f"checkpoint {s0 / 'checkpoint.pt'} is empty or truncated (0 bytes)")


def _malformed(w: World, name: str, src: Path, rel: str, text: str, argv, *needles) -> None:
    d = w.copy(src, name)
    (d / rel).write_text(text)
    w.case(f"bad_{name}", [a(d) if callable(a) else a for a in argv], d / rel, *needles)


def _malformed_cases(w: World, seed: Path, cmp: Path) -> None:
    toml, js = w.base / "bad.toml", w.base / "bad.json"
    toml.write_text('task = "copy"\nmax_steps = \n')
    js.write_text('{"task": "copy",')
    w.case("bad_config_toml", ["train", "--config", toml], toml, "malformed TOML")
    w.case("bad_config_json", ["train", "--config", js], js, "malformed JSON")
    bad = "malformed JSON at line 1 column"
    resume = [*TRAIN, "--resume", "--run-dir", lambda d: d]
    _malformed(w, "resume_config", seed.parent, "seed-0/config.json", "{", resume, bad)
    _malformed(w, "resume_summary", seed.parent, "seed-0/summary.json", "[1, 2", resume, bad)
    gen = ["generate", lambda d: d]
    _malformed(w, "generate_config", seed, "config.json", '{"task": ', gen, bad)
    _malformed(w, "generate_config_kind", seed, "config.json", "[]", gen,
               "expected a JSON object; got array")
    show = ["show-attention", "--checkpoint", lambda d: d, "--text", "[MAX 1 2 ]"]
    _malformed(w, "show_config", cmp / "train" / "sdpa" / "seed-0", "config.json", "{", show,
               bad)
    seed_rel = "train/sdpa/seed-0/"
    rerun = [*COMPARE, "--out", lambda d: d]
    report = ["report", lambda d: d]
    for cmd, argv in (("report", report), ("compare", rerun)):
        _malformed(w, f"{cmd}_plan", cmp, "plan.json", '{"task": "listops"', argv, bad)
        _malformed(w, f"{cmd}_state", cmp, "state.json", "", argv, "empty file")
        _malformed(w, f"{cmd}_seed_config", cmp, seed_rel + "config.json", "{", argv, bad)
        _malformed(w, f"{cmd}_metrics", cmp, seed_rel + "metrics.jsonl",
                   (cmp / seed_rel / "metrics.jsonl").read_text() + '{"step": 3,\n', argv,
                   "line 2")
    # a compare whose seed finished but has no row yet reads the seed's summary.json
    _malformed(w, "compare_seed_summary", cmp, seed_rel + "summary.json", "{", rerun, bad)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    pytest.importorskip("sklearn")
    w = World(tmp_path_factory.mktemp("hostile"))
    seed, inp, cmp = _starting_runs(w)
    _read_only_cases(w, inp, cmp)
    _database_cases(w, cmp)
    _checkpoint_cases(w, seed, inp, cmp)
    _malformed_cases(w, seed, cmp)
    names = list(w.cases)
    results = run_cli([w.cases[n][0] for n in names], cwd=w.base, timeout=600)
    w.results = dict(zip(names, results, strict=True))
    yield w
    for d in [*w.frozen, *w.base.rglob("*.db")]:
        d.chmod(0o755 if d.is_dir() else 0o644)  # let pytest remove its temporary tree


def test_read_only_output_directories_end_in_one_line_naming_them(world):
    world.check("ro_")


def test_a_read_only_output_is_refused_before_training_or_benchmarking(world):
    for n in (1, 2):  # the --db cases: no seed was trained before the error
        assert not (world.base / f"never-trained-{n}").exists()
    for n in ("ro_compare_out", "ro_compare_out_parent", "ro_compare_rerun"):
        assert "benchmark" not in world.results[n]["out"], world.results[n]["out"]
    for n in ("ro_report_out", "ro_report_default_out"):
        assert "attention map" not in world.results[n]["out"], world.results[n]["out"]


def test_read_only_directories_are_left_as_they_were_and_nothing_half_written(world):
    for d, before in world.frozen.items():
        assert _listing(d) == before, d
    assert [p for p in world.base.rglob("*") if p.name.endswith(".tmp")] == []


def test_unreadable_and_corrupt_databases_end_in_one_line_naming_them(world):
    world.check("db_")
    for name in ("unreadable", "corrupt"):  # the database is checked before training
        assert not (world.base / f"never-trained-{name}").exists()


def test_empty_and_truncated_checkpoints_end_in_one_line_naming_them(world):
    world.check("ckpt_")


def test_malformed_config_and_run_files_end_in_one_line_naming_them(world):
    world.check("bad_")

