"""Progress that shows also when output is not a terminal.

rich's live displays redraw one line in place on a terminal and print nothing until they stop
when stderr is a pipe or a file, so a 10-minute run said nothing to a log. :class:`LineProgress`
is the stand-in for pipes: one plain line every ``interval`` seconds and one at the end, with
the same ``add_task``/``update`` calls as ``rich.progress.Progress``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

LINE_INTERVAL_S = 5.0  # a line every few seconds: alive, without flooding a log


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (stderr) is a terminal, as rich decides it (FORCE_TERMINAL etc.)."""
    from rich.console import Console

    return Console(file=stream or sys.stderr).is_terminal


def clock(seconds: float) -> str:
    """``H:MM:SS``, as rich's time columns print it."""
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LineProgress:
    """``rich.progress.Progress``'s add_task/update for pipes: a line every few seconds.

    A line reads ``NAME  STEP/TOTAL  FIELDS  elapsed H:MM:SS  ETA H:MM:SS``, where FIELDS comes
    from ``fields_format`` (a ``str.format`` template over the task's fields).
    """

    def __init__(
        self,
        fields_format: str = "",
        interval: float = LINE_INTERVAL_S,
        stream: TextIO | None = None,
        enabled: bool = True,
    ):
        self.fields_format = fields_format
        self.interval = interval
        self.stream = stream
        self.enabled = enabled
        self._tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for task_id, task in self._tasks.items():
            if task["printed_at"] != task["completed"]:
                self._print(task_id)

    def add_task(
        self, description: str, total: float | None = None, completed: float = 0, **fields: Any
    ) -> int:
        """Start a task; returns its id for :meth:`update`."""
        task_id = len(self._tasks)
        now = time.monotonic()
        self._tasks[task_id] = {
            "description": description,
            "total": total,
            "completed": completed,
            "start_completed": completed,
            "fields": fields,
            "started": now,
            "last_line": now,
            "printed_at": None,
        }
        return task_id

    def update(
        self, task_id: int, advance: float = 0, completed: float | None = None, **fields: Any
    ) -> None:
        """Advance a task; print its line if ``interval`` passed or it just finished."""
        task = self._tasks[task_id]
        task["completed"] = completed if completed is not None else task["completed"] + advance
        task["fields"].update(fields)
        now = time.monotonic()
        finished = task["total"] is not None and task["completed"] >= task["total"]
        if finished or now - task["last_line"] >= self.interval:
            task["last_line"] = now
            self._print(task_id)

    def line(self, task_id: int) -> str:
        """The task's progress line as it would be printed now."""
        task = self._tasks[task_id]
        done, total = task["completed"], task["total"]
        elapsed = time.monotonic() - task["started"]
        parts = [task["description"], f"{done:g}/{total:g}" if total is not None else f"{done:g}"]
        if self.fields_format:
            parts.append(self.fields_format.format(**task["fields"]))
        parts.append(f"elapsed {clock(elapsed)}")
        ran = done - task["start_completed"]
        if total is not None and done < total and ran > 0:
            parts.append(f"ETA {clock(elapsed / ran * (total - done))}")
        return "  ".join(parts)

    def _print(self, task_id: int) -> None:
        self._tasks[task_id]["printed_at"] = self._tasks[task_id]["completed"]
        if self.enabled:
            print(self.line(task_id), file=self.stream or sys.stderr, flush=True)
