"""One process at a time measures a run of the results database.

Two benchmark processes on the same cores would spoil each other's timings, so the process
measuring a run holds it: a POSIX record lock (``lockf``) on the run's record in the
sidecar file ``<db>.run-locks``, where it also writes "pid P, started T" for whoever is
refused. The kernel drops the lock when the process ends, however it ends (``kill -9``
too), so a later resume is never blocked by a dead process.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["RunLocks", "RunLockError"]

_RECORD = 128  # bytes per run id in <db>.run-locks: "pid P, started T" of its holder


class RunLockError(RuntimeError):
    """Another live process is measuring the run."""


class RunLocks:
    """The run claims of the database at ``db_path`` (opened on first use)."""

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = Path(db_path)
        self.lock_path = f"{self.db_path}.run-locks"
        self._lock_fd: int | None = None

    def close(self) -> None:
        if self._lock_fd is not None:  # closing it drops this process's claims
            os.close(self._lock_fd)
            self._lock_fd = None

    # POSIX record locks (lockf) belong to the process: the kernel drops them when it ends,
    # however it ends (kill -9 too), and forked children do not inherit them. The process
    # also drops them all when it closes *any* descriptor of the lock file, so the file is
    # opened once, on the first claim, and kept open until close().
    def _locks(self) -> int:
        if self._lock_fd is None:
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        return self._lock_fd

    def _lockf(self, op: int, length: int, start: int) -> None:
        try:
            fcntl.lockf(self._locks(), op, length, start)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):  # held by another process
                raise
            # e.g. ENOLCK on a file system without locks: name the file it was about
            raise OSError(e.errno, f"cannot lock it ({e.strerror})", self.lock_path) from e

    @contextmanager
    def choosing(self) -> Iterator[None]:
        """Held (by one process at a time, waiting for its turn) while a sweep picks the run
        to resume or creates a new one and claims it: without it, a second process could
        resume a run in the moment between its creation and its claim."""
        self._lockf(fcntl.LOCK_EX, 1, 0)  # byte 0: run ids start at 1
        try:
            yield
        finally:
            self._lockf(fcntl.LOCK_UN, 1, 0)

    def claim(self, run_id: int) -> None:
        """Mark run ``run_id`` as measured by this process until :meth:`release` or
        :meth:`close` (or its end); RunLockError if another live process holds it."""
        start = run_id * _RECORD
        try:
            self._lockf(fcntl.LOCK_EX | fcntl.LOCK_NB, _RECORD, start)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raw = os.pread(self._locks(), _RECORD, start)
            holder = raw.rstrip(b"\0").decode(errors="replace") or "pid unknown"
            raise RunLockError(f"run {run_id} in {self.db_path} is being measured by another "
                               f"process ({holder}); wait for it to finish, or pass --new to "
                               f"start a separate run") from None
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        who = f"pid {os.getpid()}, started {started}".encode()
        os.pwrite(self._locks(), who.ljust(_RECORD, b"\0"), start)

    def release(self, run_id: int) -> None:
        self._lockf(fcntl.LOCK_UN, _RECORD, run_id * _RECORD)
