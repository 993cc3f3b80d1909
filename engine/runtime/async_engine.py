"""The async front of the generate engine: the step loop in its own thread, a stream per request.

``async for out in engine.generate(prompt, params)`` streams one request. The engine steps in
a thread of its own, so an event loop serving gRPC keeps accepting calls and writing tokens
while a step computes (onnxruntime releases the GIL while a graph runs); stepping on the event
loop instead left new calls waiting for the loop and half the streams outside the batch.

Hand-off, both ways cheap:

* in: ``generate`` adds the request under the engine's lock (bad input raises right there)
  and wakes the thread; the next step schedules it. Aborts take the same lock.
* out: each step's outputs go back to the event loop in one ``call_soon_threadsafe``
  callback, which gives each stream its output; a step that admits requests while others
  decode posts the newcomers' first tokens first, right after their prefill (``emit``). A
  stream whose consumer fell behind (a slow client) finds what piled up merged into one
  output: fewer, larger messages, no backlog.

The thread parks on an event while nothing is in flight and exits after ``IDLE_EXIT_S`` idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from engine.runtime.outputs import RequestOutput
from engine.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.runtime.llm_engine import LLMEngine

IDLE_EXIT_S = 5.0  # a parked step thread exits after this long without requests


class _Stream:
    """One request's outputs not yet taken by its consumer, and the consumer's wake-up."""

    __slots__ = ("pending", "error", "waiter")

    def __init__(self) -> None:
        self.pending: RequestOutput | None = None
        self.error: BaseException | None = None
        self.waiter: asyncio.Future | None = None

    def push(self, out: RequestOutput) -> None:
        pending = self.pending
        if pending is None:
            self.pending = out
        elif not pending.finished:  # nothing follows a final output
            self.pending = pending.merged(out)
        self._wake()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class AsyncFront:
    """The streams of one engine's requests and the thread that steps it while any runs."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, _Stream] = {}  # touched on the event loop's thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._closed = False

    # -- the event loop's side -------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; leaving the loop early aborts the request."""
        loop = self._bind(asyncio.get_running_loop())
        engine = self.engine
        request_id = engine.add_request(prompt, params, request_id)
        stream = self._streams[request_id] = _Stream()
        self._start()
        try:
            while True:
                if stream.pending is None and stream.error is None:
                    stream.waiter = loop.create_future()
                    try:
                        await stream.waiter
                    finally:
                        stream.waiter = None
                if stream.error is not None:
                    raise stream.error
                out, stream.pending = stream.pending, None
                yield out
                if out.finished:
                    return
        finally:
            del self._streams[request_id]
            engine.abort(request_id)  # a no-op once the request finished

    def _bind(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        """Make ``loop`` the one outputs go to; one event loop at a time has streams."""
        if self._loop is not loop:
            if self._streams:
                raise RuntimeError("this engine streams to another event loop's requests now")
            self._loop = loop
        return loop

    def emit(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their streams, from any thread (outputs of no stream are dropped).

        Always through the event loop's queue, behind the outputs the step thread posted
        before: a stream sees its outputs in the order they were made.
        """
        self._post(self._deliver, outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is not None:
                stream.push(out)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.fail(error)

    def _post(self, callback, arg) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to stream to
            loop.call_soon_threadsafe(callback, arg)

    # -- the step thread --------------------------------------------------------------------------
    def _start(self) -> None:
        with self._thread_lock:
            self._wake.set()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"engine-step-{self.engine.model.name}", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        """Step while anything is in flight; park in between; exit when idle or closed."""
        engine = self.engine
        while True:
            if not self._wake.wait(IDLE_EXIT_S):
                with self._thread_lock:
                    if not self._wake.is_set():  # nobody woke us meanwhile: leave
                        self._thread = None
                        return
            self._wake.clear()
            if self._closed:
                return
            while engine.has_unfinished and not self._closed:
                try:
                    outputs = engine.step(emit=self.emit)  # first tokens go out early
                except Exception as exc:  # fail every stream rather than hang them
                    engine.drop_all()
                    self._post(self._fail_all, exc)
                    break
                if outputs:
                    self._post(self._deliver, outputs)

    def close(self) -> None:
        """Stop the step thread (requests still in flight stay unfinished)."""
        with self._thread_lock:
            self._closed = True
            self._wake.set()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
