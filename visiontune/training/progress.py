"""A rich progress bar for one epoch, showing the running loss and accuracy."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)


class EpochProgress:
    def __init__(self, description: str, total: int, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
            transient=True, disable=not enabled,
        )
        self._task = self._progress.add_task(description, total=total, stats="")

    def __enter__(self) -> EpochProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, loss: float, accuracy: float) -> None:
        self._progress.update(self._task, advance=1, stats=f"loss {loss:.4f} acc {accuracy:.3f}")
