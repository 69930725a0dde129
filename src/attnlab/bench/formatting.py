"""How the benchmark tables and plots write numbers, statuses and hyperparameters.

Pure functions of plain values (no torch, no store), shared by :mod:`attnlab.bench.analysis`
(which re-exports them), :mod:`attnlab.bench.plots` and ``attnlab bench show``.
"""

from __future__ import annotations

from collections.abc import Mapping

from attnlab.util.fmt import format_bytes, format_length, format_time

__all__ = ["CONTEXT_KEYS", "describe_hparams", "format_bytes", "format_length",
           "format_time", "status_word"]

_WORDS = {"oom": "OOM", "FAILED": "FAILED", "timeout": "timeout", "error": "error",
          "unsupported": "unsupported", "skipped": "skipped"}
#: attnlab.registry.CONTEXT_HPARAMS (not imported: that would import torch): hyperparameters
#: that restate the configuration (D, H, N), which the table already shows in its columns.
CONTEXT_KEYS = ("head_dim", "num_heads", "max_seq_len")


def status_word(status: str) -> str:
    """The word a table or plot shows in place of a number for a non-ok point."""
    return _WORDS.get(status, status)


def describe_hparams(built: Mapping[int, Mapping | None], declared: Mapping | None = None) -> str:
    """The hyperparameters a row ran with, as built: ``built`` maps N to the effective
    hyperparameters of the module measured at that length (``None`` where none was built).

    Keys are sorted; :data:`CONTEXT_KEYS` are left out. A value the same at every length is
    ``key=value``; one that changes with N (a default derived from ``max_seq_len``) lists
    each: ``stride=32@1k/64@4k``. Nothing built at any length: the grid's ``declared``
    hyperparameters followed by ``(not built)``, or ``(not built)`` alone.
    """
    built = {n: hp for n, hp in sorted(built.items()) if hp is not None}
    if not built:
        shown = ", ".join(f"{k}={v}" for k, v in sorted((declared or {}).items()))
        return f"{shown} (not built)" if shown else "(not built)"
    keys = sorted({k for hp in built.values() for k in hp if k not in CONTEXT_KEYS})
    parts = []
    for k in keys:
        values = {n: hp.get(k) for n, hp in built.items()}
        if len({repr(v) for v in values.values()}) == 1:
            parts.append(f"{k}={next(iter(values.values()))}")
        else:
            parts.append(f"{k}=" + "/".join(f"{v}@{format_length(n)}"
                                             for n, v in values.items()))
    return ", ".join(parts) or "-"
