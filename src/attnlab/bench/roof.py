"""The matmul roof of a run and the roof fractions of its points (no torch: the store and
the analysis use it too).

The roof is measured more than once in a run (at its start, on every resume, at its end;
see :mod:`attnlab.bench.runner`), under whatever load the machine has at each moment, and
the best of those samples (the highest GFLOP/s) is the run's roof: the machine can do at
least that, and a roof measured while another process held a core would make every point
look better than it is. A fraction is ``GFLOP/s / roof``. A fraction above 1 is not a
result but a measurement error (FLOPs over-counted, or a roof measured under load): it is
stored as ``roof_fraction = NULL`` with a message saying so, and never shown.
"""

from __future__ import annotations

import math
import re

__all__ = ["ROOF_KEYS", "best_roof", "check_fraction", "record_roof", "with_roof_note"]

#: The run's machine JSON keys: the best sample, the first and the last.
ROOF_KEYS = ("roof_gflops", "roof_start_gflops", "roof_end_gflops")
_WHEN = ("start", "resume", "end")
# The message of a point whose fraction was rejected; matched to replace an older note
# when the fractions are recomputed against a better roof.
_NOTE = re.compile(r"(; )?roof fraction \S+ > 1: FLOPs or roof mis-measured")


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def record_roof(machine: dict, when: str, gflops: float) -> dict:
    """``machine`` (a run's machine JSON) with a roof sample taken at ``when`` (``start``,
    ``resume`` or ``end``) added: ``roof_samples_gflops`` lists every ``[when, GFLOP/s]``,
    ``roof_start_gflops`` / ``roof_end_gflops`` hold the first and the end sample and
    ``roof_gflops`` the best (highest) of all."""
    if when not in _WHEN:
        raise ValueError(f"record_roof: when must be one of {list(_WHEN)}; got {when!r}")
    if not _finite_positive(gflops):
        raise ValueError(f"record_roof: the measured roof must be a finite number > 0 "
                         f"GFLOP/s; got {gflops!r}")
    m = dict(machine)
    samples = [list(s) for s in m.get("roof_samples_gflops") or []]
    if not samples and _finite_positive(m.get("roof_gflops")):  # a run from before v3
        samples.append(["start", m["roof_gflops"]])
    samples.append([when, float(gflops)])
    m["roof_samples_gflops"] = samples
    m.setdefault("roof_start_gflops", samples[0][1])
    if when == "end":
        m["roof_end_gflops"] = float(gflops)
    m["roof_gflops"] = max(s[1] for s in samples)
    return m


def best_roof(machine: dict) -> float | None:
    """The run's roof in GFLOP/s: the best sample, or None when none was measured."""
    values = [machine.get(k) for k in ROOF_KEYS]
    values += [s[1] for s in machine.get("roof_samples_gflops") or []]
    good = [float(v) for v in values if _finite_positive(v)]
    return max(good) if good else None


def check_fraction(gflops: float | None, roof: float | None) -> tuple[float | None, str | None]:
    """``(fraction, None)`` for ``gflops / roof <= 1``; ``(None, note)`` above 1, the note
    saying it is a measurement error; ``(None, None)`` when either is missing."""
    if not _finite_positive(gflops) or not _finite_positive(roof):
        return None, None
    fraction = gflops / roof
    if fraction > 1.0:
        return None, f"roof fraction {fraction:.2f} > 1: FLOPs or roof mis-measured"
    return fraction, None


def with_roof_note(message: str | None, note: str | None) -> str:
    """``message`` without any earlier roof note, with ``note`` (if any) appended."""
    base = _NOTE.sub("", message or "").strip()
    base = base.removeprefix("; ")
    if note is None:
        return base
    return f"{base}; {note}" if base else note
