"""The results database: SQLite in WAL mode, one table of runs and one of measurements.

A run records where and what was measured (machine fingerprint, versions, git commit, the
grid, start and end); a measurement is one point of it, keyed by ``(run_id, point_key)``
so that a resumed sweep can never store a point twice. Every measurement is committed as
soon as it exists: a sweep killed at any moment leaves a consistent database.

The schema version lives in ``PRAGMA user_version``. A database written by a newer attnlab
is refused before anything is written to it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA_VERSION", "Store", "StoreError", "MEASUREMENT_COLUMNS"]

SCHEMA_VERSION = 2  # v2 added the trainings table (one row per trained seed)
MEASUREMENT_COLUMNS = (
    "mechanism", "label", "hparams", "N", "batch", "heads", "head_dim", "dtype", "pass_",
    "causal", "device", "status", "time_s", "time_iqr_s", "runs", "peak_mem_bytes", "flops",
    "gflops_per_s", "roof_fraction", "error", "gate_error", "gate_tol", "message", "wall_s",
    "timed_s",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,               -- running | done | interrupted
    profile TEXT,
    command TEXT,
    grid TEXT NOT NULL,                 -- JSON
    grid_digest TEXT NOT NULL,
    machine TEXT NOT NULL,              -- JSON: cpu, cores, ram_gib, gpu, roof_gflops
    fingerprint TEXT NOT NULL,
    versions TEXT NOT NULL,             -- JSON: python, torch, attnlab
    git_commit TEXT,
    points_total INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS measurements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    point_key TEXT NOT NULL,
    mechanism TEXT NOT NULL, label TEXT NOT NULL, hparams TEXT NOT NULL,
    N INTEGER NOT NULL, batch INTEGER NOT NULL, heads INTEGER NOT NULL,
    head_dim INTEGER NOT NULL, dtype TEXT NOT NULL, pass_ TEXT NOT NULL,
    causal INTEGER NOT NULL, device TEXT NOT NULL,
    status TEXT NOT NULL,  -- ok | FAILED | oom | timeout | error | unsupported | skipped
    time_s REAL, time_iqr_s REAL, runs INTEGER, peak_mem_bytes INTEGER, flops REAL,
    gflops_per_s REAL, roof_fraction REAL, error REAL, gate_error REAL, gate_tol REAL,
    message TEXT NOT NULL DEFAULT '', wall_s REAL, timed_s REAL, finished_at TEXT NOT NULL,
    UNIQUE (run_id, point_key)
);
""" + """
CREATE TABLE IF NOT EXISTS trainings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_dir TEXT NOT NULL UNIQUE,       -- a re-finished run replaces its row
    task TEXT NOT NULL, model TEXT NOT NULL, mechanism TEXT NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL,               -- done | early_stopped | time_budget
    steps INTEGER NOT NULL, train_time_s REAL NOT NULL, throughput REAL,
    metric TEXT NOT NULL, mode TEXT NOT NULL, best_validation REAL, test_value REAL,
    parameters INTEGER, summary TEXT NOT NULL,   -- JSON: the run's summary.json
    config TEXT NOT NULL, versions TEXT NOT NULL, machine TEXT NOT NULL,
    git_commit TEXT, finished_at TEXT NOT NULL
);
"""


class StoreError(RuntimeError):
    """The database cannot be used (newer schema, not a database, unknown run)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Store:
    """``Store(path)`` opens (or creates) the results database at ``path``."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists() and not create:
            raise StoreError(f"results database {self.path} does not exist")
        if self.path.exists():
            self._check_version()  # read-only look first: a newer schema is never touched
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30)
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            if self.db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                with self.db:  # new database, or v1: CREATE IF NOT EXISTS adds what is new
                    self.db.executescript(_SCHEMA)
                    self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise StoreError(f"{self.path} is not an attnlab results database ({e})") from e

    def _check_version(self) -> None:
        try:
            ro = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                v = ro.execute("PRAGMA user_version").fetchone()[0]
                tables = {r[0] for r in ro.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'")}
            finally:
                ro.close()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not an SQLite database ({e}); "
                             f"pass another --db") from e
        if v > SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer attnlab (schema v{v}; this "
                             f"version reads up to v{SCHEMA_VERSION}); upgrade attnlab or "
                             f"pass another --db")
        if v == 0 and tables:
            raise StoreError(f"{self.path} is an SQLite database but not attnlab's (tables "
                             f"{sorted(tables)}, no schema version); pass another --db")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------ runs
    def new_run(self, *, grid: dict, digest: str, machine: dict, fingerprint: str,
                versions: dict, commit: str | None, command: str, profile: str | None,
                points_total: int) -> int:
        with self.db:
            cur = self.db.execute(
                "INSERT INTO runs (started_at, status, profile, command, grid, grid_digest, "
                "machine, fingerprint, versions, git_commit, points_total) "
                "VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (_now(), profile, command, json.dumps(grid), digest, json.dumps(machine),
                 fingerprint, json.dumps(versions), commit, points_total))
        return int(cur.lastrowid)

    def resumable(self, digest: str, fingerprint: str) -> int | None:
        """The latest unfinished run of the same grid on the same machine, if any."""
        row = self.db.execute(
            "SELECT id FROM runs WHERE grid_digest=? AND fingerprint=? AND status!='done' "
            "ORDER BY id DESC LIMIT 1", (digest, fingerprint)).fetchone()
        return None if row is None else int(row["id"])

    def set_status(self, run_id: int, status: str) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET status=?, finished_at=? WHERE id=?",
                            (status, _now() if status == "done" else None, run_id))

    def run(self, run_id: int | str) -> dict[str, Any]:
        rid = self.resolve(run_id)
        row = dict(self.db.execute("SELECT * FROM runs WHERE id=?", (rid,)).fetchone())
        for k in ("grid", "machine", "versions"):
            row[k] = json.loads(row[k])
        row["run_id"] = row["id"]
        row["commit"] = row["git_commit"]
        return row

    def runs(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT r.*, (SELECT COUNT(*) FROM measurements m WHERE m.run_id=r.id) AS done, "
            "(SELECT COUNT(*) FROM measurements m WHERE m.run_id=r.id AND m.status='ok') AS ok "
            "FROM runs r ORDER BY r.id").fetchall()
        return [dict(r) for r in rows]

    def resolve(self, run_id: int | str) -> int:
        """A run id from ``3``, ``"3"`` or ``"latest"``; clear error when absent."""
        if run_id == "latest":
            row = self.db.execute("SELECT MAX(id) AS id FROM runs").fetchone()
            if row["id"] is None:
                raise StoreError(f"{self.path} holds no runs yet")
            return int(row["id"])
        try:
            rid = int(run_id)
        except (TypeError, ValueError):
            raise StoreError(f"run id must be an integer or 'latest'; got {run_id!r}") from None
        if self.db.execute("SELECT 1 FROM runs WHERE id=?", (rid,)).fetchone() is None:
            known = [r["id"] for r in self.db.execute("SELECT id FROM runs ORDER BY id")]
            raise StoreError(f"no run {rid} in {self.path} (runs: {known or 'none'})")
        return rid

    # ---------------------------------------------------------------- measurements
    def done_keys(self, run_id: int) -> set[str]:
        return {r[0] for r in self.db.execute(
            "SELECT point_key FROM measurements WHERE run_id=?", (run_id,))}

    def add(self, run_id: int, point_key: str, row: dict[str, Any]) -> None:
        values = {c: row.get(c) for c in MEASUREMENT_COLUMNS}
        values["hparams"] = json.dumps(values["hparams"] or {}, sort_keys=True)
        values["causal"] = int(bool(values["causal"]))
        values["message"] = values["message"] or ""
        cols = ", ".join(values)
        with self.db:  # one transaction per point: a kill never leaves half a row
            self.db.execute(
                f"INSERT INTO measurements (run_id, point_key, finished_at, {cols}) "
                f"VALUES (?, ?, ?, {', '.join('?' * len(values))})",
                (run_id, point_key, _now(), *values.values()))

    # ------------------------------------------------------------------- trainings
    def add_training(self, row: dict[str, Any]) -> None:
        cols = ("run_dir", "task", "model", "mechanism", "seed", "status", "steps",
                "train_time_s", "throughput", "metric", "mode", "best_validation",
                "test_value", "parameters", "summary", "config", "versions", "machine",
                "git_commit")
        values = [json.dumps(row[c], default=float) if c in ("summary", "config", "versions",
                                                             "machine") else row.get(c)
                  for c in cols]
        with self.db:
            self.db.execute(f"INSERT OR REPLACE INTO trainings ({', '.join(cols)}, finished_at)"
                            f" VALUES ({', '.join('?' * len(cols))}, ?)", (*values, _now()))

    def trainings(self, task: str | None = None) -> list[dict[str, Any]]:
        q, args = "SELECT * FROM trainings", ()
        if task is not None:
            q, args = q + " WHERE task=?", (task,)
        rows = [dict(r) for r in self.db.execute(q + " ORDER BY id", args)]
        for r in rows:
            for k in ("summary", "config", "versions", "machine"):
                r[k] = json.loads(r[k])
        return rows

    def measurements(self, run_id: int | str) -> list[dict[str, Any]]:
        rid = self.resolve(run_id)
        rows = self.db.execute("SELECT * FROM measurements WHERE run_id=? ORDER BY id",
                               (rid,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["hparams"] = json.loads(d["hparams"])
            d["causal"] = bool(d["causal"])
            out.append(d)
        return out
