"""A progress display of named export stages (trace, optimize, validate, write) with timings."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Stages:
    """Show each stage as a spinner line that turns into a tick, and record its duration.

    With ``show=False`` nothing is printed; the durations are still recorded for the manifest.
    """

    def __init__(self, show: bool = True, console: Console | None = None):
        self.seconds: dict[str, float] = {}
        self._progress: Progress | None = None
        if show:
            self._progress = Progress(
                SpinnerColumn(finished_text="[green]✓[/green]"),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=console or Console(stderr=True),
            )

    def __enter__(self) -> Stages:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        if self._progress is not None:
            if exc_type is not None:  # the error message says what failed: leave only it
                self._progress.live.transient = True
            self._progress.stop()

    @contextlib.contextmanager
    def stage(self, label: str) -> Iterator[None]:
        """Time one stage; a failure marks it failed in the display and propagates."""
        task = self._progress.add_task(label, total=1) if self._progress is not None else None
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if self._progress is not None and task is not None:
                self._progress.update(task, description=f"[red]{label} (failed)[/red]")
            raise
        finally:
            self.seconds[label] = round(time.perf_counter() - start, 3)
        if self._progress is not None and task is not None:
            self._progress.update(task, completed=1)
