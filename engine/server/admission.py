"""A bounded admission queue: a fixed number of requests run, a fixed number wait, the rest fail.

Past ``max_running + max_waiting`` a request is refused at once (RESOURCE_EXHAUSTED) instead of
piling up: memory stays bounded under any load and a client learns immediately to back off.
Waiters are served first in, first out; a waiter whose call is cancelled leaves the queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from engine.server.errors import overloaded


class AdmissionQueue:
    """Admit up to ``max_running`` requests at a time with at most ``max_waiting`` in line."""

    def __init__(self, name: str, max_running: int, max_waiting: int):
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.name = name
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Requests in line for a slot."""
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a running slot for the body; raise RESOURCE_EXHAUSTED if the line is full."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise overloaded(
                f"model {self.name!r} is at capacity ({self.running} running, "
                f"{len(self._waiters)} waiting); retry with backoff"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # _release hands the slot over (running stays counted for us)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot arrived as we were cancelled: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1
