"""Reading and writing the small files attnlab keeps (run configs, summaries, plans, states).

Two rules that every such file follows:

* a write is atomic: the text goes to a temporary file in the same directory, is flushed
  to disk and renamed over the target, so a process killed mid-write leaves the old file
  or the new one, never half of one;
* a read that fails names the file and says what is wrong with it (missing, unreadable,
  not UTF-8, malformed JSON at line L column C, not the expected kind of value), as a
  :class:`FileFormatError` (a ``ValueError``) or the ``OSError`` with its file name.

And where a command will write (``--out``, ``--run-dir``, ``--db``) is checked when it
starts (:func:`writable_dir`, :func:`writable_database`, :func:`readable_file`), not after
minutes of training or benchmarking. The checks try what the command will do (create a
file, open one) rather than ask ``os.access``: that is what the kernel will allow,
whatever the user, capabilities, ACLs or mount.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["FileFormatError", "atomic_path", "read_json", "readable_file", "writable_database",
           "writable_dir", "write_json", "write_text_atomic"]


class FileFormatError(ValueError):
    """A file that exists but whose content is not what attnlab expects there."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file next to ``path`` for the block to write (by any means: a library's
    own writer, say); when the block ends without an error it is flushed to disk and
    renamed over ``path``, else removed. Readers see the old file or the new one. Its
    suffix is ``.tmp``: a writer that picks its format by the suffix (``savefig``) must be
    given the format."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see the module docstring)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any, **dump_kwargs: Any) -> Path:
    """``data`` as JSON (indent 2 unless given), written atomically."""
    dump_kwargs.setdefault("indent", 2)
    return write_text_atomic(path, json.dumps(data, **dump_kwargs) + "\n")


def read_json(path: str | Path, what: str = "file", *, kind: type | None = dict) -> Any:
    """The JSON value in ``path``; ``what`` says in errors what the file is ("run config").

    ``kind`` (default ``dict``) is the type the top-level value must have (None: any).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        detail = "empty file" if not text.strip() else \
            f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        raise FileFormatError(f"{what} {path}: {detail}") from None
    if kind is not None and not isinstance(data, kind):
        raise FileFormatError(f"{what} {path}: expected a JSON {_json_name(kind)}; got "
                              f"{_json_name(type(data))}")
    return data


def _json_name(t: type) -> str:
    return {dict: "object", list: "array", str: "string", float: "number", int: "number",
            bool: "boolean", type(None): "null"}.get(t, t.__name__)


# ------------------------------------------------------------- where commands write
def _reason(e: OSError) -> str:
    return (e.strerror or type(e).__name__).lower()


def writable_dir(path: str | Path, what: str, *, hint: str = "") -> Path:
    """``path``, a directory that may not exist yet (it is created later, with its missing
    parents), can receive files; else an OSError whose message names the directory that
    refuses them: ``"--out: cannot write to DIR: permission denied"``."""
    path = Path(path)
    anc = path
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    to_create = "" if anc == path else f" (to create {path})"
    hint = f"; {hint}" if hint else ""
    if not anc.is_dir():
        raise NotADirectoryError(f"{what}: cannot write to {path}: {anc} is a file, not a "
                                 f"directory{hint}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".attnlab-write-check-", dir=anc)
    except OSError as e:
        raise type(e)(f"{what}: cannot write to {anc}: {_reason(e)}{to_create}{hint}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def readable_file(path: str | Path, what: str, *, flag: str = "") -> Path:
    """``path`` exists and this process can read it; else an OSError naming it:
    ``"cannot read results database DB (--db): permission denied"``."""
    path = Path(path)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        flag = f" ({flag})" if flag else ""
        raise type(e)(f"cannot read {what} {path}{flag}: {_reason(e)}") from None
    return path


def writable_database(path: str | Path, what: str) -> Path:
    """An SQLite file that results will be added to: readable and writable if it exists,
    in a directory that can take new files (SQLite creates its journal, or its ``-wal``
    and ``-shm`` files, next to the database, even to change one row)."""
    path = Path(path)
    if not path.is_file():
        return writable_dir(path.parent, what, hint=f"{path.name} would be created there")
    readable_file(path, "results database", flag=what)
    try:
        with open(path, "r+b"):  # opened for writing, nothing written
            pass
    except OSError as e:
        raise type(e)(f"{what}: cannot write to {path}: {_reason(e)}") from None
    return writable_dir(path.parent, what, hint=f"SQLite keeps the journal of {path.name} "
                                                f"in its directory")
