"""The training progress display: one bar for all steps and one for the current epoch."""

from __future__ import annotations

from rich.console import Console

from attnlab.util.progress import make_progress

__all__ = ["TrainProgress"]


class TrainProgress:
    """``with TrainProgress(total_steps) as bar: bar.start_epoch(...); bar.advance(loss)``."""

    def __init__(self, total_steps: int, *, enabled: bool = True,
                 console: Console | None = None) -> None:
        self.total = total_steps
        self.progress = make_progress(extra=("loss {task.fields[loss]}",), console=console,
                                      enabled=enabled)
        self._steps = None
        self._epoch = None

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start_steps(self, done: int) -> None:
        self._steps = self.progress.add_task("steps", total=self.total, completed=done,
                                             loss="-")

    def start_epoch(self, epoch: int, batches: int, done: int) -> None:
        if self._epoch is not None:
            self.progress.remove_task(self._epoch)
        self._epoch = self.progress.add_task(f"epoch {epoch}", total=batches, completed=done,
                                             loss="-")

    def advance(self, loss: float) -> None:
        for t in (self._steps, self._epoch):
            if t is not None:
                self.progress.update(t, advance=1, loss=f"{loss:.4f}")
