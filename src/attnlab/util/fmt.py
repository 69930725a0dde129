"""How attnlab writes numbers for people: times, byte counts, sequence lengths.

Pure functions of plain values, used by the benchmark tables and plots, the reports and
the command line alike.
"""

from __future__ import annotations

__all__ = ["format_time", "format_bytes", "format_mib", "format_length"]


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


def format_mib(b: float, digits: int = 1) -> str:
    """Bytes in MiB at a fixed precision (``22.0 MiB``): for columns that compare sizes,
    where one unit for every row reads better than :func:`format_bytes`' choice per row."""
    return f"{b / 2**20:.{digits}f} MiB"
