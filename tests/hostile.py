"""Hostile surroundings for command-line tests: read-only directories, unreadable and
corrupt files, run as a user whom file permissions bind.

CI runs as root, and root writes into a ``chmod 555`` directory. So the commands under test
run in a child process whose capability bounding set lacks ``CAP_DAC_OVERRIDE`` and
``CAP_DAC_READ_SEARCH``: still uid 0 (so it can read the installed packages) but bound by
permission bits like any user. ``run_cli`` runs many command lines in one child (torch is
imported once) and returns, per command line, its exit code, stdout and stderr, or the
traceback of an exception that escaped ``attnlab.cli.main.main``.
"""

from __future__ import annotations

import ctypes
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

_CHILD = r"""
import contextlib, io, json, sys, traceback
from attnlab.cli.main import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    crash = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:
        code, crash = None, traceback.format_exc()
    results.append({"argv": argv, "code": code, "out": out.getvalue(),
                    "err": err.getvalue(), "crash": crash})
print("\n@@RESULTS@@" + json.dumps(results))
"""


def _drop_dac_capabilities() -> None:
    """In the child before exec: root's next exec gets only the bounding set's capabilities."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap})")


def run_cli(cases: list[list[str]], *, cwd: str | Path, env: dict | None = None,
            timeout: float = 300) -> list[dict]:
    """Run each argv of ``cases`` through ``main()`` in one unprivileged child process."""
    full_env = {**os.environ, "ATTNLAB_DEBUG": "", **(env or {})}
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)], cwd=cwd,
                              env=full_env, capture_output=True, text=True,
                              timeout=timeout, preexec_fn=_drop_dac_capabilities)
    except subprocess.SubprocessError as e:  # prctl refused: a container without CAP_SETPCAP
        if "preexec_fn" not in str(e):
            raise
        pytest.skip(f"cannot drop root's permission-bypassing capabilities here ({e})")
    marker = proc.stdout.rfind("@@RESULTS@@")
    if marker < 0:
        raise AssertionError(f"the child died (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout[marker + len("@@RESULTS@@"):])


def assert_one_clear_line(res: dict, *needles: str) -> str:
    """A non-zero exit, no traceback, and stderr ending in one ``error:`` line that
    contains every needle; returns that line."""
    assert res["crash"] is None, f"{res['argv']} raised:\n{res['crash']}"
    assert res["code"] not in (0, None), f"{res['argv']} exited {res['code']}: {res}"
    text = res["out"] + res["err"]
    assert "Traceback" not in text, f"{res['argv']} printed a traceback:\n{text}"
    lines = [ln for ln in res["err"].splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], \
        f"{res['argv']}: expected one closing error line, got stderr:\n{res['err']}"
    for needle in needles:
        assert needle in errors[0], f"{res['argv']}: {needle!r} not in {errors[0]!r}"
    return errors[0]


def read_only(path: str | Path) -> Path:
    """Make ``path`` (a directory) read-only for the unprivileged child."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    return path


def corrupt_database(path: str | Path) -> Path:
    """An attnlab results database whose pages past the header are overwritten: SQLite
    opens it and then reports ``database disk image is malformed``."""
    from attnlab.bench.store import Store

    path = Path(path)
    with Store(path) as s:
        s.db.execute("PRAGMA journal_mode=DELETE")
        with s.db:
            for i in range(200):
                s.db.execute("INSERT INTO runs (started_at, status, grid, grid_digest, "
                             "machine, fingerprint, versions, points_total) VALUES "
                             "(?, 'done', '{}', ?, '{}', 'fp', '{}', 0)", (str(i), "x" * 200))
    data = bytearray(path.read_bytes())
    page = 4096
    for off in range(page, len(data), page):  # every page but the first (the header)
        data[off + 8:off + 64] = os.urandom(56)
    path.write_bytes(bytes(data))
    con = sqlite3.connect(path)
    try:
        ok = con.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError:
        ok = "malformed"
    finally:
        con.close()
    assert ok != "ok", "the corruption did not take"
    return path
