"""The one progress bar of attnlab's long work (benchmark sweeps, trainings, comparisons).

Every bar shows the same columns in the same order: what runs, the bar, done/total, time
elapsed and the estimate of the time left, so a user reads them alike everywhere.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["make_progress"]


def make_progress(label: str = "{task.description}", *, extra: tuple[str, ...] = (),
                  trailing: str | None = None, console: Console | None = None,
                  enabled: bool = True, transient: bool = False) -> Progress:
    """A rich ``Progress`` with attnlab's columns: ``label``, bar, M/N, ``extra`` text
    columns (e.g. ``"loss {task.fields[loss]}"``), elapsed, "eta" and time remaining, then
    ``trailing`` (e.g. the runs in flight). ``enabled=False`` shows nothing."""
    columns: list[ProgressColumn | str] = [TextColumn(label), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(text) for text in extra]
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    if trailing is not None:
        columns.append(TextColumn(trailing))
    return Progress(*columns, console=console, disable=not enabled, transient=transient)
