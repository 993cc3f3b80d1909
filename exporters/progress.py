"""A progress display of named export stages (trace, optimize, validate, write) with timings."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from engine.progress import LINE_INTERVAL_S, clock, is_terminal


class Stages:
    """Show each stage as a spinner line that turns into a tick, and record its duration.

    On a pipe or a file (no spinner can redraw there) a stage prints a line every few seconds
    while it runs and a tick line when it ends; a failed one prints nothing more, as the
    terminal display leaves only the error. With ``show=False`` nothing is printed; the
    durations are still recorded for the manifest.
    """

    def __init__(self, show: bool = True, console: Console | None = None):
        self.seconds: dict[str, float] = {}
        self._progress: Progress | None = None
        self._lines = False
        if show and (console is not None or is_terminal()):
            self._progress = Progress(
                SpinnerColumn(finished_text="[green]✓[/green]"),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=console or Console(stderr=True),
            )
        elif show:
            self._lines = True

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
        beat = _Heartbeat(label, start) if self._lines else None
        try:
            yield
        except BaseException:
            if self._progress is not None and task is not None:
                self._progress.update(task, description=f"[red]{label} (failed)[/red]")
            if beat is not None:
                beat.stop(None)  # the error message says what failed
            raise
        finally:
            self.seconds[label] = round(time.perf_counter() - start, 3)
        if self._progress is not None and task is not None:
            self._progress.update(task, completed=1)
        if beat is not None:
            beat.stop(f"✓ {label}")


class _Heartbeat:
    """Print ``label  H:MM:SS`` every few seconds while a stage runs, and a final line."""

    def __init__(self, label: str, start: float):
        self.label, self.start = label, start
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(LINE_INTERVAL_S):
            _print(f"  {self.label}  {clock(time.perf_counter() - self.start)}")

    def stop(self, final: str | None) -> None:
        self._done.set()
        self._thread.join()
        if final is not None:
            _print(f"{final}  {clock(time.perf_counter() - self.start)}")


def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
