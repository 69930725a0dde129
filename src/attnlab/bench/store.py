"""The results database: SQLite in WAL mode, one table of runs and one of measurements.

A run records where and what was measured (machine fingerprint, versions, git commit, the
grid, start and end); a measurement is one point of it, keyed by ``(run_id, point_key)``
so that a resumed sweep can never store a point twice. Every measurement is committed as
soon as it exists: a sweep killed at any moment leaves a consistent database.

The schema (:mod:`attnlab.bench.schema`) version lives in ``PRAGMA user_version``; an
older database opened for writing is upgraded in place (v2 -> v3 adds two columns). A
database written by a newer attnlab, or one that fails ``PRAGMA quick_check``, is refused
before anything is written to it; a command that only reads opens the database read-only
(``readonly=True``), so a read-only file or directory still shows its runs. Every SQLite
error a method meets is re-raised as a :class:`StoreError` that names the file.

One process at a time measures a run: ``store.locks`` (:class:`~attnlab.bench.runlock.RunLocks`)
claims it with an OS lock that dies with the process.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from attnlab.bench.roof import check_fraction, with_roof_note
from attnlab.bench.runlock import RunLocks
from attnlab.bench.schema import MEASUREMENT_COLUMNS, SCHEMA_VERSION, upgrade

__all__ = ["SCHEMA_VERSION", "Store", "StoreError", "MEASUREMENT_COLUMNS"]

class StoreError(RuntimeError):
    """The database cannot be used (newer schema, not a database, corrupt, read-only,
    unknown run, a run another process is measuring)."""


# Errors of attnlab's own SQL (a violated constraint, a closed connection): defects, kept
# as they are so that the command line reports them as such; every other DatabaseError is
# about the file (corrupt, read-only, locked, disk full) and gets its name.
_OWN_ERRORS = (sqlite3.IntegrityError, sqlite3.ProgrammingError)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _naming_the_file(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except _OWN_ERRORS:
            raise
        except sqlite3.DatabaseError as e:
            raise self._error(e) from e
    return wrapper


def _sqlite_errors_name_the_file(cls):
    """Class decorator: every public method re-raises SQLite's errors as a StoreError that
    names the database (SQLite's own text, "database disk image is malformed", does not)."""
    for name, value in list(vars(cls).items()):
        if callable(value) and not name.startswith("_"):
            setattr(cls, name, _naming_the_file(value))
    return cls


def _is_corrupt(e: sqlite3.DatabaseError) -> bool:
    code = getattr(e, "sqlite_errorname", "")  # Python >= 3.11; the text otherwise
    return code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or any(
        w in str(e) for w in ("malformed", "not a database"))


@_sqlite_errors_name_the_file
class Store:
    """``Store(path)`` opens (or creates) the results database at ``path`` for writing;
    ``Store(path, readonly=True)`` opens an existing one for reading only."""

    def __init__(self, path: str | Path, *, create: bool = True, readonly: bool = False) -> None:
        self.path = Path(path)
        self.locks = RunLocks(self.path)
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory, not a results database file; "
                             f"pass a file to --db")
        if not self.path.exists():
            if readonly or not create:
                raise StoreError(f"results database {self.path} does not exist")
        elif not os.access(self.path, os.R_OK):  # SQLite: "unable to open database file"
            raise StoreError(f"{self.path} is not readable (permission denied); pass "
                             f"another --db")
        else:  # read-only looks first: a newer, foreign or corrupt file is never touched
            self._inspect(integrity=not readonly)
        self.db = self._open_for_reading() if readonly else self._open_for_writing()

    def _open_for_reading(self) -> sqlite3.Connection:
        db = self._connect_for_reading()
        db.row_factory = sqlite3.Row
        if db.execute("PRAGMA user_version").fetchone()[0] == 0:
            db.close()
            raise StoreError(f"{self.path} is an empty database: it holds no attnlab "
                             f"results yet")
        return db

    def _open_for_writing(self) -> sqlite3.Connection:
        problem = self._write_problem()
        if problem:
            raise StoreError(f"{problem}; pass another --db")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                upgrade(db)  # new database, v1 or v2: one transaction
        except sqlite3.DatabaseError as e:
            db.close()
            raise self._error(e, f"{self.path} is not an attnlab results database ({e})") from e
        return db

    def _error(self, e: sqlite3.DatabaseError, other: str | None = None) -> StoreError:
        """``e`` as a StoreError naming the file and, where known, what to do about it."""
        if _is_corrupt(e):
            return StoreError(f"{self.path} is corrupt ({e}); move it aside or pass "
                              f"another --db")
        if getattr(e, "sqlite_errorname", "").startswith("SQLITE_READONLY") or \
                "readonly" in str(e):
            return StoreError(f"{self.path} is read-only ({e}): cannot store results in it; "
                              f"pass another --db")
        return StoreError(other or f"{self.path}: {e}")

    def _write_problem(self) -> str | None:
        """Why results cannot be stored at ``self.path``, asked of the file system before
        SQLite is (which would say "unable to open database file" or fail mid-sweep)."""
        p = self.path
        if p.exists():
            if not os.access(p, os.W_OK):
                return f"{p} is read-only (the file is not writable): cannot store results in it"
            if not os.access(p.parent, os.W_OK | os.X_OK):
                return (f"{p} is read-only (its directory {p.parent} is not writable, and "
                        f"SQLite keeps its journal there): cannot store results in it")
            return None
        ancestor = next(a for a in (p.parent, *p.parent.parents) if a.exists() or a == a.parent)
        if not ancestor.is_dir():
            return f"cannot create {p}: {ancestor} is a file, not a directory"
        if not os.access(ancestor, os.W_OK | os.X_OK):
            return f"cannot create {p}: the directory {ancestor} is not writable"
        return None

    def _connect_for_reading(self) -> sqlite3.Connection:
        """A connection that cannot change the database. A file this process could write
        is opened as a writer would open it, with writes refused (``query_only``): only a
        writer's connection removes the WAL's ``-wal`` and ``-shm`` files when it closes,
        and a reading command should not leave them behind."""
        if os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK | os.X_OK):
            con = sqlite3.connect(self.path, timeout=30)
            con.execute("PRAGMA query_only=ON")
            return con
        return self._connect_readonly()

    def _connect_readonly(self) -> sqlite3.Connection:
        """A read-only connection; in a directory this process cannot write, where SQLite
        cannot create a WAL database's ``-shm`` file, the file is read as it stands
        (``immutable=1``) when no write-ahead log holds changes it does not have."""
        uri = f"{self.path.absolute().as_uri()}?mode=ro"
        con = sqlite3.connect(uri, uri=True, timeout=30)
        try:
            con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return con
        except sqlite3.OperationalError as e:
            con.close()
            if os.access(self.path.parent, os.W_OK):
                raise  # not the read-only directory: the caller says what is wrong
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.exists() and wal.stat().st_size:
                raise StoreError(f"{self.path} cannot be read here: its directory is read-only "
                                 f"and its write-ahead log {wal} holds changes not merged "
                                 f"into it yet; open it once where it is writable") from e
        return sqlite3.connect(f"{uri}&immutable=1", uri=True)

    def _inspect(self, *, integrity: bool) -> None:
        """Refuse, before anything is written, a file that is not an SQLite database, is
        another program's, was written by a newer attnlab or (``integrity``) is corrupt."""
        try:
            ro = self._connect_readonly()
            try:
                v = ro.execute("PRAGMA user_version").fetchone()[0]
                tables = {r[0] for r in ro.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'")}
                problems = self._quick_check(ro) if integrity else []
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
        if problems:
            raise StoreError(f"{self.path} is corrupt (quick_check: {'; '.join(problems)}); "
                             f"it was not modified; move it aside or pass another --db")

    @staticmethod
    def _quick_check(con: sqlite3.Connection) -> list[str]:
        """What ``PRAGMA quick_check`` finds wrong (its first three findings, one line
        each, without its "*** in database main ***" banner); [] if ok."""
        try:
            found = [str(r[0]) for r in con.execute("PRAGMA quick_check(3)")]
        except sqlite3.DatabaseError as e:  # too broken to even walk its pages
            found = [str(e)]
        if found == ["ok"]:
            return []
        lines = [ln.strip() for f in found for ln in f.splitlines()]
        return [ln[:200] for ln in lines if ln and not ln.startswith("***")][:3]

    def close(self) -> None:
        self.db.close()
        self.locks.close()  # drops this process's claims

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

    def set_machine(self, run_id: int, machine: dict) -> None:
        """Replace a run's machine JSON (a roof sample was added to it)."""
        with self.db:
            self.db.execute("UPDATE runs SET machine=? WHERE id=?", (json.dumps(machine), run_id))

    def set_roof_fractions(self, run_id: int, roof: float | None) -> None:
        """Recompute every stored fraction of the run against ``roof`` (its best so far),
        in one transaction: a fraction above 1 becomes NULL with the message saying so."""
        rows = self.db.execute("SELECT id, gflops_per_s, message FROM measurements WHERE "
                               "run_id=? AND gflops_per_s IS NOT NULL", (run_id,)).fetchall()
        with self.db:
            for r in rows:
                fraction, note = check_fraction(r["gflops_per_s"], roof)
                self.db.execute("UPDATE measurements SET roof_fraction=?, message=? WHERE id=?",
                                (fraction, with_roof_note(r["message"], note), r["id"]))

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

    def add(self, run_id: int, point_key: str, row: dict[str, Any]) -> bool:
        """Store one point; False (and nothing changed) if the run already holds it: the
        same key is the same point, and the first measurement of it is kept."""
        values = {c: row.get(c) for c in MEASUREMENT_COLUMNS}
        for k in ("hparams", "effective_hparams"):
            if values[k] is not None or k == "hparams":
                values[k] = json.dumps(values[k] or {}, sort_keys=True)
        values["causal"] = int(bool(values["causal"]))
        values["message"] = values["message"] or ""
        cols = ", ".join(values)
        with self.db:  # one transaction per point: a kill never leaves half a row
            cur = self.db.execute(
                f"INSERT INTO measurements (run_id, point_key, finished_at, {cols}) "
                f"VALUES (?, ?, ?, {', '.join('?' * len(values))}) "
                f"ON CONFLICT (run_id, point_key) DO NOTHING",
                (run_id, point_key, _now(), *values.values()))
        return cur.rowcount == 1

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

    # ----------------------------------------------------------------- generations
    def add_generation(self, row: dict[str, Any], machine: dict) -> None:
        """One point of :mod:`attnlab.bench.generation` (its GENERATION_COLUMNS)."""
        cols = [c for c in row if c != "hparams"]
        with self.db:
            self.db.execute(
                f"INSERT INTO generations (measured_at, hparams, machine, {', '.join(cols)}) "
                f"VALUES (?, ?, ?, {', '.join('?' * len(cols))})",
                (_now(), json.dumps(row["hparams"]), json.dumps(machine),
                 *(row[c] for c in cols)))

    def generations(self) -> list[dict[str, Any]]:
        rows = [dict(r) for r in self.db.execute("SELECT * FROM generations ORDER BY id")]
        for r in rows:
            r["hparams"], r["machine"] = json.loads(r["hparams"]), json.loads(r["machine"])
        return rows

    def measurements(self, run_id: int | str) -> list[dict[str, Any]]:
        rid = self.resolve(run_id)
        rows = self.db.execute("SELECT * FROM measurements WHERE run_id=? ORDER BY id",
                               (rid,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["hparams"] = json.loads(d["hparams"])
            eff = d.get("effective_hparams")  # absent from a v2 file read as it stands
            d["effective_hparams"] = json.loads(eff) if eff else None
            d.setdefault("flops_method", None)
            d["causal"] = bool(d["causal"])
            if (d["roof_fraction"] or 0) > 1:  # an older run's: an error, never a result
                d["roof_fraction"], note = check_fraction(d["roof_fraction"], 1.0)
                d["message"] = with_roof_note(d["message"], note)
            out.append(d)
        return out
