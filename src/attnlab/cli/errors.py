"""How the command line ends on an error: one line on stderr, a non-zero exit code.

A user who gave a bad argument, an unwritable directory or a broken file needs to know
which file or argument and what is wrong with it, not a traceback; ``--debug`` (anywhere
on the command line, or ``ATTNLAB_DEBUG=1``) shows the traceback as well.

Exit codes: 2 for what the user can fix (bad input, files, permissions, databases,
checkpoints), 1 for a defect of attnlab itself (the line says so and asks for --debug),
130 for an interrupt.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import traceback

from rich.console import Console
from rich.markup import escape

from attnlab.bench.runlock import RunLockError
from attnlab.bench.store import StoreError
from attnlab.train.checkpoint import CheckpointError

__all__ = ["USER_ERRORS", "error_line", "report_error", "take_debug_flag"]

# What a user can fix. ValueError covers ConfigError and DataError, RuntimeError subclasses
# are listed one by one: a bare RuntimeError from inside torch is a defect, not bad input.
USER_ERRORS = (ValueError, TypeError, OSError, sqlite3.Error, StoreError, RunLockError,
               CheckpointError)


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def error_line(e: BaseException) -> str:
    """The one-line description of ``e`` that the command prints after ``error:``."""
    if isinstance(e, OSError) and e.filename is not None:
        what = e.strerror or type(e).__name__
        names = str(e.filename) + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{names}: {what}"
    if isinstance(e, sqlite3.Error):
        return f"database error: {_one_line(e)}"
    if isinstance(e, USER_ERRORS):
        return _one_line(e) or type(e).__name__
    return (f"internal error ({type(e).__name__}: {_one_line(e)}); this is a defect of "
            f"attnlab: run again with --debug and report the traceback")


def take_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (accepted anywhere), and whether it was there."""
    debug = "--debug" in argv or os.environ.get("ATTNLAB_DEBUG", "") not in ("", "0")
    return [a for a in argv if a != "--debug"], debug


def report_error(e: BaseException, *, debug: bool) -> int:
    """Print ``e`` as one line on stderr (and its traceback with ``debug``); the exit code."""
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    err.print(f"[red]error:[/red] {escape(error_line(e))}")
    return 2 if isinstance(e, USER_ERRORS) else 1
