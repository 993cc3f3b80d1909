"""The async front of the generate engine: one stream per request, a loop stepping them all.

``async for out in engine.generate(prompt, params)`` streams one request while a background
task steps the engine for every request in flight; leaving the loop early aborts the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from engine.runtime.outputs import RequestOutput
from engine.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.runtime.llm_engine import LLMEngine


class AsyncFront:
    """Streams of one engine's requests and the task that steps it while any is in flight."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop_task: asyncio.Task | None = None

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; leaving the loop early aborts the request."""
        engine = self.engine
        request_id = engine.add_request(prompt, params, request_id)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._ensure_loop()
        try:
            while True:
                item = await queue.get()
                # A consumer that fell behind (a slow client, a busy server) gets everything
                # that piled up as one output: fewer, larger messages instead of a backlog.
                while not queue.empty() and isinstance(item, RequestOutput) and not item.finished:
                    following = queue.get_nowait()
                    item = (
                        item.merged(following)
                        if isinstance(following, RequestOutput)
                        else following
                    )
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if request_id in engine.scheduler.requests:
                engine.abort(request_id)

    def emit(self, outputs: list[RequestOutput]) -> None:
        """Hand each output to its request's stream (outputs of no stream are dropped)."""
        for o in outputs:
            queue = self._queues.get(o.request_id)
            if queue is not None:
                queue.put_nowait(o)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def _run_loop(self) -> None:
        """Step while anything is in flight, yielding to the event loop between steps."""
        engine = self.engine
        try:
            while engine.has_unfinished:
                self.emit(engine.step())
                await asyncio.sleep(0)  # let the streams and new requests in between steps
        except Exception as exc:  # fail every stream rather than hang them
            for rid in list(engine.scheduler.requests):
                engine.scheduler.abort(rid)
            for queue in self._queues.values():
                queue.put_nowait(exc)
