"""The part of serving both protocols share: admission, cancellation, metrics, logs, statuses.

A servicer turns protobuf into plain values, calls :class:`Serving` inside :meth:`Serving.rpc`,
and turns the result back into protobuf. Every failure leaves ``rpc`` as a gRPC status; a
cancelled call (client gone, deadline passed) aborts its generation so the KV memory is freed.

Shutdown: once :meth:`Serving.drain` starts, every new request is refused with UNAVAILABLE
(clients retry elsewhere) and in-flight ones may finish; :meth:`Serving.cut` ends the ones
still running with UNAVAILABLE as well. No request is ever left with a bare CANCELLED.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from engine.server import logs
from engine.server.admission import AdmissionQueue
from engine.server.errors import invalid, status_of, unavailable
from engine.server.metrics import ServerMetrics
from engine.server.models import Chunk, ModelSet, ModelStats, ServedModel
from engine.server.statistics import VersionStats

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces (fullmatch)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for and how many may be in the server at once (per model)."""

    max_running: int = 64  # requests handed to the runtime at once, per model
    max_waiting: int = 256  # requests in line behind them; past this -> RESOURCE_EXHAUSTED
    max_message_bytes: int = 4 << 20  # a larger request -> INVALID_ARGUMENT
    max_batch: int = 256  # texts, digits or prompts in one request
    max_prompt_chars: int = 1 << 20  # longer prompts are refused before tokenizing


class MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the handler can answer properly."""

    def __init__(self, type_name: str, error: Exception):
        self.type_name = type_name
        self.error = error


def safe_deserializer(deserialize: Callable[[bytes], Any], type_name: str) -> Callable:
    """Wrap a ``FromString`` so undecodable bytes become a :class:`MalformedRequest`."""

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or invalid UTF-8 in a string field
            return MalformedRequest(type_name, exc)

    return parse


def check_parsed(request: Any, limits: Limits) -> None:
    """Refuse a request that did not parse or is larger than ``limits.max_message_bytes``."""
    if isinstance(request, MalformedRequest):
        raise invalid(f"the request is not a valid {request.type_name} message: {request.error}")
    size = request.ByteSize()
    if size > limits.max_message_bytes:
        raise invalid(
            f"the request is {size} bytes; this server accepts at most "
            f"{limits.max_message_bytes} bytes per message: split it into smaller requests"
        )


@dataclass
class Call:
    """One RPC in flight: its id, method and model, and how it ended (for logs and metrics)."""

    method: str
    request_id: str
    model: str = ""  # set once the model is known to be served (keeps label cardinality low)
    status: str = "OK"
    start: float = field(default_factory=time.perf_counter)
    fields: dict[str, Any] = field(default_factory=dict)
    served: list[Any] = field(default_factory=list)  # model versions it holds (see Serving.model)


class Serving:
    """The served models with their admission queues, metrics and the RPC bookkeeping."""

    def __init__(self, models: ModelSet, metrics: ServerMetrics, limits: Limits | None = None):
        self.models = models
        self.metrics = metrics
        self.limits = limits or Limits()
        self.queues: dict[str, AdmissionQueue] = {}
        self.stats: dict[int, VersionStats] = {}  # id(model version) -> its counters
        self._leases: Counter[int] = Counter()  # id(model version) -> calls holding it
        self._retiring: dict[int, asyncio.Event] = {}  # set when the last call lets go
        self._ids = itertools.count()
        self.draining = False  # set at shutdown: new requests get UNAVAILABLE
        self._in_flight: set[asyncio.Task] = set()  # handlers of admitted RPCs
        self._idle = asyncio.Event()
        self._idle.set()
        self._cut = False
        for model in models:
            self.serve(model)
        metrics.watch_runtime(lambda: {n: self.models.latest(n).stats() for n in models.names()})

    def serve(self, model: ServedModel) -> None:
        """Set up queue, gauges and statistics for a version about to be served."""
        name = model.card.name
        if name not in self.queues:
            self.queues[name] = AdmissionQueue(
                name, self.limits.max_running, self.limits.max_waiting
            )
            self.metrics.watch(name, self._gauges_reader(name), kv=model.card.task == "generate")
        self.stats[id(model)] = VersionStats()

    async def retire(self, model: ServedModel) -> None:
        """Wait until no call holds ``model`` (a version no longer served), then close it."""
        key = id(model)
        if self._leases[key] > 0:
            self._retiring[key] = asyncio.Event()
            await self._retiring[key].wait()
            del self._retiring[key]
        self._leases.pop(key, None)
        self.stats.pop(key, None)
        await model.close()

    def _gauges_reader(self, name: str) -> Callable[[], dict[str, float]]:
        def read() -> dict[str, float]:
            model = self.models.latest(name)
            stats = model.stats() if model is not None else ModelStats()
            queue = self.queues[name]
            return {
                "queue_length": queue.waiting + stats.num_waiting,
                "running": queue.running,
                "kv_blocks_used": stats.kv_blocks_used,
                "kv_blocks_free": stats.kv_blocks_free,
                "sequences_running": stats.num_running,
            }

        return read

    # -- bookkeeping ------------------------------------------------------------------------------
    def request_id(self, context: grpc.aio.ServicerContext, given: str = "") -> str:
        """The caller's id (request field, else ``x-request-id`` metadata), else a new one."""
        if not given:
            for key, value in context.invocation_metadata() or ():
                if key == REQUEST_ID_HEADER and isinstance(value, str):
                    given = value
                    break
        if not given:
            return uuid.uuid4().hex
        if not _REQUEST_ID_RE.fullmatch(given):  # `$` would let a trailing newline through
            raise invalid("request_id must be 1-128 printable ASCII characters without spaces")
        return given

    def runtime_id(self, request_id: str) -> str:
        """A unique runtime id: callers may reuse their ids, the runtime may not."""
        return f"{request_id}#{next(self._ids)}"

    # -- shutdown -------------------------------------------------------------------------------
    def check_open(self) -> None:
        """Refuse with UNAVAILABLE once the server drains (a client retries another replica)."""
        if self.draining:
            raise unavailable("the server is shutting down; retry on another replica")

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests; wait up to ``timeout`` s for in-flight ones. True if all ended."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def cut(self) -> None:
        """End every in-flight request now with UNAVAILABLE (their generations are aborted)."""
        self.draining = self._cut = True
        tasks = list(self._in_flight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _track(self) -> asyncio.Task | None:
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
            self._idle.clear()
        return task

    def _untrack(self, task: asyncio.Task | None) -> None:
        self._in_flight.discard(task)
        if not self._in_flight:
            self._idle.set()

    # -- bookkeeping (continued) ------------------------------------------------------------------
    @asynccontextmanager
    async def rpc(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[Call]:
        """Run one RPC's body: failures become statuses; metrics and a log line at the end."""
        call = Call(method=method, request_id=uuid.uuid4().hex)
        task = None
        try:
            self.check_open()
            task = self._track()
            yield call
        except asyncio.CancelledError:
            if not self._cut:
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                call.status = "DEADLINE_EXCEEDED" if expired else "CANCELLED"
                raise
            call.status = "UNAVAILABLE"  # cut at shutdown: tell the client to go elsewhere
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the server shut down before this request finished; retry on another replica",
                trailing_metadata=self._trailer(call),
            )
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, detail = status_of(exc)
            call.status = code.name
            if code == grpc.StatusCode.INTERNAL:
                logs.log("internal error", logging.ERROR, exc_info=True, **self._fields(call))
                detail = f"{detail} (request id {call.request_id})"
            await context.abort(code, detail, trailing_metadata=self._trailer(call))
        else:
            context.set_trailing_metadata(self._trailer(call))
        finally:
            self._untrack(task)
            self.finish(call)
            self.metrics.requests.labels(call.model, method, call.status).inc()
            if call.status == "OK" and call.model:
                self.metrics.e2e.labels(call.model, method).observe(
                    time.perf_counter() - call.start
                )
            logs.log(
                "request",
                **self._fields(call),
                status=call.status,
                duration_ms=logs.elapsed_ms(call.start),
            )

    def finish(self, call: Call) -> None:
        """Count ``call`` in its model version's statistics and let go of the versions it held."""
        if call.served:
            stats = self.stats.get(id(call.served[0]))
            if stats is not None:
                stats.finished(call.status == "OK", time.perf_counter() - call.start)
        for model in call.served:
            key = id(model)
            self._leases[key] -= 1
            if self._leases[key] == 0 and key in self._retiring:
                self._retiring[key].set()
        call.served.clear()

    @staticmethod
    def _trailer(call: Call) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_HEADER, call.request_id),)

    @staticmethod
    def _fields(call: Call) -> dict[str, Any]:
        return {
            "request_id": call.request_id,
            "method": call.method,
            "model": call.model,
            **call.fields,
        }

    def model(self, call: Call, name: str, version: str = "", task: str | None = None):
        """Look up a served model for ``call`` (NOT_FOUND / INVALID_ARGUMENT as statuses)."""
        model = self.models.get(name, version, task)
        call.model = model.card.name
        self._leases[id(model)] += 1  # released by finish(): an unloaded version waits for it
        call.served.append(model)
        return model

    @asynccontextmanager
    async def admitted(self, model: ServedModel, items: int = 1) -> AsyncIterator[None]:
        """Hold an admission slot of ``model``, timing the wait (queue) and the hold (compute).

        ``items`` (texts, digits, one prompt) count as inferred when the body succeeds.
        """
        stats = self.stats.get(id(model)) or VersionStats()
        asked = time.perf_counter()
        async with self.queues[model.card.name].slot():
            start = time.perf_counter()
            stats.queue.add(start - asked)
            try:
                yield
                stats.inference_count += items
            finally:
                stats.compute.add(time.perf_counter() - start)

    # -- the three tasks ----------------------------------------------------------------------
    async def generate(
        self, call: Call, model: ServedModel, prompt: str, params: Any
    ) -> AsyncIterator[Chunk]:
        """Stream a generation under admission; abort it in the runtime if the caller leaves."""
        self.check_open()
        if not prompt:
            raise invalid("prompt is empty: send at least one character of text")
        if len(prompt) > self.limits.max_prompt_chars:
            raise invalid(
                f"prompt is {len(prompt)} characters; the limit is {self.limits.max_prompt_chars}"
                f" (and the model's context is {model.card.context_length} tokens)"
            )
        name = model.card.name
        runtime_id = self.runtime_id(call.request_id)
        async with self.admitted(model):
            start = time.perf_counter()
            first: float | None = None
            finished = False
            chunk = None
            try:
                async with aclosing(model.generate(runtime_id, prompt, params)) as chunks:
                    async for chunk in chunks:
                        if first is None and chunk.token_ids:
                            first = time.perf_counter()
                            self.metrics.ttft.labels(name).observe(first - call.start)
                        finished = chunk.finish_reason is not None
                        yield chunk
            finally:
                if not finished:
                    model.abort(runtime_id)  # the caller left or failed: free the KV memory now
                if chunk is not None:
                    self._count_tokens(name, chunk, first, start)

    def _count_tokens(self, name: str, last: Chunk, first: float | None, start: float) -> None:
        self.metrics.prompt_tokens.labels(name).inc(last.prompt_tokens)
        self.metrics.generation_tokens.labels(name).inc(last.completion_tokens)
        if first is not None and last.completion_tokens > 1:
            per_token = (time.perf_counter() - first) / (last.completion_tokens - 1)
            self.metrics.tpot.labels(name).observe(per_token)

    def check_batch(self, what: str, n: int) -> None:
        """Refuse an empty batch or one past ``limits.max_batch``."""
        if n == 0:
            raise invalid(f"{what} is empty: send at least one")
        if n > self.limits.max_batch:
            raise invalid(
                f"{what} has {n} entries; the limit is {self.limits.max_batch} per request: "
                "split it into several requests"
            )

    async def classify(self, model: ServedModel, texts: list[str]) -> np.ndarray:
        """Class probabilities (N, labels) for ``texts`` under admission."""
        self.check_open()
        self.check_batch("texts", len(texts))
        for i, text in enumerate(texts):
            if not text:
                raise invalid(f"texts[{i}] is empty: every text needs at least one character")
            if len(text) > self.limits.max_prompt_chars:
                raise invalid(
                    f"texts[{i}] is {len(text)} characters; the limit is "
                    f"{self.limits.max_prompt_chars}"
                )
        async with self.admitted(model, len(texts)):
            return await model.classify(texts)

    async def classify_tensor(self, model: ServedModel, rows: np.ndarray) -> np.ndarray:
        """Class probabilities (N, labels) for tensor ``rows`` (N, ...) under admission."""
        self.check_open()
        self.check_batch(model.card.input_name, len(rows))
        async with self.admitted(model, len(rows)):
            return await model.classify_tensor(rows)

    async def sample_images(self, model: ServedModel, digits: list[int], seed: int) -> np.ndarray:
        """Images (N, C, H, W) for ``digits`` under admission."""
        self.check_open()
        self.check_batch("digits", len(digits))
        n = model.card.num_classes
        for i, digit in enumerate(digits):
            if not 0 <= digit < n:
                raise invalid(f"digits[{i}] is {digit}; this model draws digits 0 to {n - 1}")
        async with self.admitted(model, len(digits)):
            return await model.sample_images(digits, seed)
