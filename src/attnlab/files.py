"""Reading and writing the small files attnlab keeps (run configs, summaries, plans, states).

Two rules that every such file follows:

* a write is atomic: the text goes to a temporary file in the same directory, is flushed
  to disk and renamed over the target, so a process killed mid-write leaves the old file
  or the new one, never half of one;
* a read that fails names the file and says what is wrong with it (missing, unreadable,
  not UTF-8, malformed JSON at line L column C, not the expected kind of value), as a
  :class:`FileFormatError` (a ``ValueError``) or the ``OSError`` with its file name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["FileFormatError", "read_json", "write_json", "write_text_atomic"]


class FileFormatError(ValueError):
    """A file that exists but whose content is not what attnlab expects there."""


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see the module docstring)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
