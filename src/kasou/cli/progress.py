"""A rich progress display for long builds (the default guest, the nested host)."""

from __future__ import annotations

from types import TracebackType

from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

__all__ = ["BuildProgress"]


class BuildProgress:
    """Shows each build step as a bar on stderr; implements ``kasou.image.Progress``."""

    def __init__(self) -> None:
        from rich.console import Console

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> BuildProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._task is not None and kind is None:
            self._progress.update(self._task, completed=1.0)
        self._progress.stop()

    def step(self, name: str) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=1.0)
        self._task = self._progress.add_task(name, total=1.0)

    def advance(self, fraction: float) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=fraction)
