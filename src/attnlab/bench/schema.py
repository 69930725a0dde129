"""The results database's schema and its upgrade from older versions (see
:mod:`attnlab.bench.store`). The version lives in ``PRAGMA user_version``.
"""

from __future__ import annotations

import sqlite3

__all__ = ["ADDED_COLUMNS", "MEASUREMENT_COLUMNS", "SCHEMA", "SCHEMA_VERSION", "upgrade"]

# v2 added the trainings table (one row per trained seed); v3 the measurements' FLOP method
# and effective hyperparameters (ADDED_COLUMNS), and start/end roofs in a run's machine JSON;
# v4 the generations table (attnlab.bench.generation: decoding cost after a prompt).
SCHEMA_VERSION = 4
MEASUREMENT_COLUMNS = (
    "mechanism", "label", "hparams", "N", "batch", "heads", "head_dim", "dtype", "pass_",
    "causal", "device", "status", "time_s", "time_iqr_s", "runs", "peak_mem_bytes", "flops",
    "gflops_per_s", "roof_fraction", "error", "gate_error", "gate_tol", "message", "wall_s",
    "timed_s", "flops_method", "effective_hparams",
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,               -- running | done | interrupted
    profile TEXT,
    command TEXT,
    grid TEXT NOT NULL,                 -- JSON
    grid_digest TEXT NOT NULL,
    machine TEXT NOT NULL,              -- JSON: cpu, cores, ram_gib, gpu, roof_gflops, ...
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
    flops_method TEXT,                  -- analytic:MODEL | FlopCounterMode (NULL before v3)
    effective_hparams TEXT,             -- JSON: the built module's hp (NULL: none built)
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
CREATE TABLE IF NOT EXISTS generations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    measured_at TEXT NOT NULL,
    mechanism TEXT NOT NULL, hparams TEXT NOT NULL,      -- JSON
    prompt_len INTEGER NOT NULL, new_tokens INTEGER NOT NULL,
    embed_dim INTEGER NOT NULL, num_heads INTEGER NOT NULL, threads INTEGER NOT NULL,
    kind TEXT NOT NULL,                 -- kv_cache | state
    status TEXT NOT NULL,               -- ok | error | timeout
    prefill_s REAL, tokens_per_s REAL, first_ms REAL, last_ms REAL,
    cache_bytes INTEGER, peak_decode_bytes INTEGER, message TEXT,
    machine TEXT NOT NULL               -- JSON
);
"""


#: Columns of ``measurements`` added after it was first created: an older table gains them
#: by ``ALTER TABLE ... ADD COLUMN`` (NULL in its old rows, which readers take as unknown).
ADDED_COLUMNS = (("flops_method", "TEXT"), ("effective_hparams", "TEXT"))


def upgrade(db: sqlite3.Connection) -> None:
    """Bring a database below :data:`SCHEMA_VERSION` (new, v1 or v2) up to it in one
    transaction: ``CREATE TABLE IF NOT EXISTS`` adds missing tables, ``ALTER TABLE`` the
    missing columns; a failure leaves it as it was."""
    have = {r[1] for r in db.execute("PRAGMA table_info(measurements)")}
    alter = "".join(f"ALTER TABLE measurements ADD COLUMN {name} {kind};\n"
                    for name, kind in ADDED_COLUMNS if have and name not in have)
    try:
        db.executescript(f"BEGIN;\n{SCHEMA}{alter}PRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;")
    except sqlite3.Error:
        if db.in_transaction:
            db.rollback()
        raise
