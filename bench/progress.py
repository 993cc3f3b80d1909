"""A rich progress display for ``engine bench run``: one bar per run, requests done of total."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from bench.runner import NullProgress


class RichProgress(NullProgress):
    """Shows each run as it goes; finished runs stay on screen with their elapsed time."""

    def __init__(self, console: Console):
        self._bar = Progress(
            TextColumn("{task.description:<32}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._task = None
        self._total = 0

    def __enter__(self) -> RichProgress:
        return self  # the display starts with the first run, so early errors print cleanly

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def start(self, label: str, total: int) -> None:
        """A bar for the new run."""
        self._bar.start()  # a no-op once started
        self._task = self._bar.add_task(label, total=total)
        self._total = total

    def advance(self) -> None:
        """One request finished (called from the bench's thread)."""
        if self._task is not None:
            self._bar.advance(self._task)

    def finish(self) -> None:
        """Fill the bar (batched baselines may report only at the end)."""
        if self._task is not None:
            self._bar.update(self._task, completed=self._total)
            self._task = None
