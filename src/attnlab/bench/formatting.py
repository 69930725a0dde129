"""How the benchmark tables and plots write numbers, statuses and hyperparameters.

Pure functions of plain values (no torch, no store), shared by :mod:`attnlab.bench.analysis`
(which re-exports them), :mod:`attnlab.bench.plots` and ``attnlab bench show``.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def format_time(s: float) -> str:
    """Seconds in human units with 3 significant digits: ``12.3 us``, ``4.56 ms``, ``1.20 s``."""
    for unit, scale, limit in (("ns", 1e9, 999.5e-9), ("us", 1e6, 999.5e-6), ("ms", 1e3, 0.9995)):
        if s < limit:
            return _sig3(s * scale) + " " + unit
    return _sig3(s) + " s"


def format_bytes(b: float) -> str:
    """Bytes in binary units: ``512 B``, ``1.50 KiB``, ``12.0 MiB``, ``3.00 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return _sig3(b / scale) + " " + unit
    return f"{b:.0f} B"


def _sig3(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 99.95 else f"{v:.1f}" if abs(v) >= 9.995 else f"{v:.2f}"


def format_length(n: float) -> str:
    """A sequence length, compactly: multiples of 1024 as ``4k``, ``16k``; anything else
    (an interpolated crossover) as a plain number to 3 significant digits: ``3330``."""
    if n >= 1024 and n % 1024 == 0:
        return f"{int(n) // 1024}k"
    return f"{float(f'{n:.3g}'):.0f}" if n >= 1 else f"{n:.3g}"


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
