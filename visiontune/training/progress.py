"""A rich progress bar for one epoch, showing the running loss and accuracy (refreshed every few steps)."""

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

    def update(self, stats: tuple[float, float] | None = None) -> None:
        """One step more; `stats` (running loss, accuracy) when the loop has read them."""
        if stats is None:
            self._progress.update(self._task, advance=1)
        else:
            self._progress.update(self._task, advance=1, stats=f"loss {stats[0]:.4f} acc {stats[1]:.3f}")
