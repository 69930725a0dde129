"""The sweep files in ``benchmarks/`` and the readers that make docs tables from their runs.

One harness: every benchmark is a sweep file run by ``attnlab bench run --sweep``, and the
scripts left in ``benchmarks/`` only read results. So: each sweep validates; a typo in a
sweep key is refused with the close one; ``long_hparams = false`` gives the registry's
defaults; the ``subquadratic`` group and named ``block_sparse`` layouts mean what they
say; and the readers' tables hold the stored numbers (checked against hand-computed ones).
"""

from __future__ import annotations

import ast
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from attnlab.bench import layouts
from attnlab.bench.grid import grid_from_file, make_grid, read_settings
from attnlab.bench.runner import run_sweep
from attnlab.bench.store import Store
from attnlab.cli.main import main as cli

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SWEEPS = sorted(BENCH.glob("*.toml"))
TINY = ["--n", "16", "32", "--batch", "1", "--heads", "2", "--head-dim", "8", "--threads", "1",
        "--min-run-time", "0.01", "--timeout", "60", "--no-progress"]


@pytest.fixture
def readers(monkeypatch):
    """The report scripts of benchmarks/, importable as they import each other."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_spread
    import long_context
    import peers_table

    return bench_spread, long_context, peers_table


# ----------------------------------------------------------------- one harness
def test_benchmarks_holds_sweeps_and_readers_only():
    assert {p.name for p in SWEEPS} >= {"exact_family.toml", "long_context.toml",
                                        "long_context_kernel.toml", "peers.toml",
                                        "registry_defaults.toml"}
    assert not (BENCH / "_harness.py").exists()
    measuring = {"_harness", "attnlab.bench.runner", "attnlab.bench.measure", "torch",
                 "torch.utils.benchmark", "multiprocessing", "resource"}
    for script in BENCH.glob("*.py"):
        tree = ast.parse(script.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & measuring, f"{script.name} measures: imports {imported & measuring}"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_file_validates(path):
    grid = grid_from_file(path)
    assert grid.points()
    text = path.read_text()
    assert f"--sweep benchmarks/{path.name}" in text  # says how it is run


def test_sweep_hyperparameters_are_the_package_s():
    """long_context gets the window sizes from LONG_HPARAMS (no copy in the file), the
    registry sweep none of them."""
    path = BENCH / "long_context.toml"
    long = {m.name: dict(m.hparams) for m in grid_from_file(path).mechanisms}
    assert long["sliding_window"] == {"window": 256} and long["local"] == {"block_size": 256}
    assert all(isinstance(m, str) for m in read_settings(path, "test")["mechanisms"])
    reg = grid_from_file(BENCH / "registry_defaults.toml")
    assert all(m.hparams == () for m in reg.mechanisms)
    assert {m.label for m in reg.mechanisms} >= {"sliding_window", "local", "sparse_transformer"}


# ------------------------------------------------------------- sweep-file keys
def test_an_unknown_sweep_key_is_refused_with_the_close_one(tmp_path, capsys):
    sweep = tmp_path / "typo.toml"
    sweep.write_text('mechanisms = ["sdpa"]\nlenghts = [8]\nlong_hparam = false\n')
    db = tmp_path / "never.db"
    assert cli(["bench", "run", "--sweep", str(sweep), "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"typo.toml: unknown setting 'lenghts' \(did you mean 'lengths'\?\), "
                     r"'long_hparam' \(did you mean 'long_hparams'\?\)", err), err
    assert not db.exists()


def test_long_hparams_false_gives_the_registry_defaults_and_keeps_old_digests():
    kw = dict(mechanisms=["sdpa", "sliding_window"], lengths=[8])
    assert [m.label for m in make_grid(**kw).mechanisms] == ["sdpa", "sliding_window(window=256)"]
    plain = make_grid(long_hparams=False, **kw)
    assert [m.label for m in plain.mechanisms] == ["sdpa", "sliding_window"]
    # Digests from before the key existed (computed with the previous grid.py): an
    # unfinished run started then still resumes; the new setting is a different grid.
    assert make_grid(mechanisms=["sdpa"], lengths=[8]).digest() == "843d1b06eb74039c"
    assert make_grid(mechanisms=["sdpa"], lengths=[8], long_hparams=False).digest() != \
        "843d1b06eb74039c"
    with pytest.raises(ValueError, match=r"long_hparams must be a bool; got str 'no'"):
        make_grid(long_hparams="no", **kw)


def test_the_subquadratic_group():
    names = {m.name for m in make_grid(mechanisms="subquadratic", lengths=[8]).mechanisms}
    assert {"linear", "performer", "sparse_transformer", "sinkhorn", "local", "flash",
            "sdpa", "nystromformer", "linformer", "reformer"} <= names
    # O(N^2) memory, and additive's "autograd keeps O(N^2 A)": out.
    assert not names & {"reference", "dot", "scaled_dot", "general", "additive",
                        "synthesizer_dense", "synthesizer_random"}


# --------------------------------------------------------------- named layouts
def test_band_layouts():
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]).bool()
    assert torch.equal(layouts.band(4, 1), expected)
    assert torch.equal(layouts.band(3, 0), torch.eye(3, dtype=torch.bool))
    hp = layouts.resolve("block_sparse", {"block_size": 256, "layout": "band:1"}, 1000)
    assert torch.equal(hp["layout"], expected)  # ceil(1000 / 256) = 4 blocks
    assert layouts.resolve("local", {"block_size": 4}, 8) == {"block_size": 4}


@pytest.mark.parametrize("layout,pattern", [
    ("bnad:1", r"a named layout must be 'band:W'.*got 'bnad:1'"),
    ("band:-1", r"must be 'band:W'"),
    ("band:01", r"must be 'band:W'"),
])
def test_bad_named_layouts_are_refused_before_anything_runs(layout, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_grid(mechanisms=[{"name": "block_sparse", "layout": layout}], lengths=[8])


def test_a_named_layout_runs_and_computes_its_pattern(tmp_path):
    """band:0 is local's block diagonal (the same function, so the same stored error on the
    same inputs); a band as wide as the blocks is full attention (error at rounding)."""
    g = make_grid(mechanisms=[{"name": "block_sparse", "block_size": 8, "layout": "band:0"},
                              {"name": "local", "block_size": 8},
                              {"name": "block_sparse", "block_size": 8, "layout": "band:3"}],
                  lengths=[32], batch=[1], heads=[2], head_dim=[8], threads=1,
                  min_run_time=0.01, timeout_s=60.0)
    with Store(tmp_path / "b.db") as s:
        rows = {r["label"]: r for r in s.measurements(run_sweep(g, s, progress=False))}
    assert {r["status"] for r in rows.values()} == {"ok"}, rows
    diag = rows["block_sparse(block_size=8, layout=band:0)"]
    assert diag["effective_hparams"]["layout"] == "band:0"
    assert diag["error"] > 0.1  # a sparse pattern on random inputs: far from exact
    assert math.isclose(diag["error"], rows["local(block_size=8)"]["error"], rel_tol=1e-5)
    assert rows["block_sparse(block_size=8, layout=band:3)"]["error"] < 1e-5


# --------------------------------------------------------------------- readers
def _row(label, n, t, *, mech=None, p="fwd", status="ok", mem=None, error=None, causal=False):
    return {"mechanism": mech or label.split("(")[0], "label": label, "N": n, "pass_": p,
            "causal": causal, "batch": 1, "heads": 8, "head_dim": 64, "dtype": "float32",
            "device": "cpu", "status": status, "time_s": t if status == "ok" else None,
            "peak_mem_bytes": mem, "error": error}


def test_long_context_table_fits_from_4k_to_32k(readers):
    _, long_context, _ = readers
    ns = [1024, 4096, 8192, 16384, 32768]
    rows = [_row("linear", n, 1e-9 * n**1.5 * (50 if n == 1024 else 1), mem=2**30) for n in ns]
    rows += [_row("sdpa", n, 1e-10 * n**2) for n in ns]
    rows += [_row("reference", 16384, None, status="oom")]
    lines = long_context.table(rows).splitlines()
    assert lines[0] == ("| mechanism | pass | 1k | 4k | 8k | 16k | 32k | exponent 4k–32k | "
                        "mem@16k / reference | × sdpa @16k |")
    linear = next(line for line in lines if line.startswith("| linear |"))
    cells = [c.strip() for c in linear.strip("|").split("|")]
    assert cells[2] == f"{1e-9 * 1024**1.5 * 50:.3f}"  # the 1K outlier is shown, not fitted
    assert cells[7] == "1.50"
    assert cells[8] == f"{100 * 2**30 / (2 * 8 * 16384**2 * 4):.1f}%"  # 0.2%
    assert cells[9] == f"{(1e-10 * 16384**2) / (1e-9 * 16384**1.5):.2f}"
    assert "| reference | fwd |  |  |  | OOM |  |" in "\n".join(lines)


def test_peers_table_pairs_each_mechanism_with_its_peer(readers):
    _, _, peers_table = readers
    run = [_row("performer(num_features=256)", 4096, 0.2, error=0.8),
           _row("peer:performer_pytorch(nb_features=256)", 4096, 0.3,
                mech="peer:performer_pytorch", error=0.81),
           _row("performer(num_features=256)", 4096, 0.5, p="fwd+bwd"),
           _row("peer:performer_pytorch(nb_features=256)", 4096, 0.6, p="fwd+bwd",
                mech="peer:performer_pytorch"),
           _row("block_sparse(layout=band:1)", 4096, 0.1),
           _row("peer:local_attention", 4096, None, mech="peer:local_attention",
                status="unsupported"),
           _row("sdpa", 4096, 1.0)]
    second = [dict(r, time_s=r["time_s"] * 2) if r["time_s"] else r for r in run]
    out = peers_table.table(peers_table.collect([run, second]))
    perf = next(line for line in out.splitlines() if line.startswith("| performer /"))
    cells = [c.strip() for c in perf.strip("|").split("|")]
    assert cells[:5] == ["performer / peer:performer_pytorch", "4k", "0.450 (0.300–0.600)",
                         "0.300 (0.200–0.400)", "1.50 (1.50–1.50)"]
    assert cells[7] == "1.20 (1.20–1.20)" and cells[8:] == ["0.8100 (0.8100–0.8100)",
                                                           "0.8000 (0.8000–0.8000)"]
    local = next(line for line in out.splitlines() if line.startswith("| block_sparse /"))
    assert "| unsupported |" in local and "sdpa" not in out


def test_bench_spread_reads_a_sweep_run(tmp_path, capsys, readers):
    """A tiny run of the exact-family sweep through the command line, then the reader:
    its cells are the stored values, ratios within the run."""
    bench_spread, _, _ = readers
    sweep = tmp_path / "exact_family.toml"
    shutil.copy(BENCH / "exact_family.toml", sweep)
    db = str(tmp_path / "e.db")
    assert cli(["bench", "run", "--sweep", str(sweep), *TINY, "--pass", "fwd",
                "--db", db]) == 0
    capsys.readouterr()
    bench_spread.main(["--db", db, "--runs", "latest"])
    out = capsys.readouterr().out
    with Store(db, readonly=True) as s:
        rows = {(r["label"], r["N"]): r for r in s.measurements("latest")}
    assert {r["status"] for r in rows.values()} == {"ok"}
    for (label, n), r in rows.items():
        line = next(x for x in out.splitlines() if x.startswith(f"| {n} | fwd | {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        ratio = r["time_s"] / rows[("sdpa", n)]["time_s"]
        assert cells[3:6] == [f"{r['time_s']:.3f}", f"{ratio:.2f}",
                              f"{r['peak_mem_bytes'] / 2**20:.0f}"]
        assert cells[9] == "analytic:softmax_attention"
