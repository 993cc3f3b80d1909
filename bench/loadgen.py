"""The async load generator: requests sent at a fixed concurrency or as a Poisson process.

:func:`drive` is the driver every async runner shares: request ``i`` is sent at its arrival
offset (all at once without a rate), at most ``concurrency`` are in flight, and each request's
start is taken when it is actually sent (as in vLLM). :class:`GrpcRunner` drives the served
model over gRPC with a streaming ``grpc.aio`` client; the in-process baseline reuses the driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import numpy as np

from bench.baselines.base import Baseline, RequestRecord, output_lens
from engine.client import sampling_params
from engine.errors import EngineError
from engine.proto import engine_pb2 as pb
from engine.proto import engine_pb2_grpc

CONNECT_TIMEOUT_S = 10.0
Send = Callable[[Any], Awaitable[RequestRecord]]


def arrival_offsets(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """Send times (seconds after the run starts) of ``n`` requests: a Poisson process at ``rate``.

    Gaps are exponential with mean ``1 / rate`` and the first request goes at 0; an infinite
    rate sends everything at once.
    """
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate) or n == 0:
        return np.zeros(n)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


async def drive(
    send: Send,
    items: Sequence[Any],
    concurrency: int | None = None,
    offsets: np.ndarray | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Send every item through ``send`` and return the records in item order."""
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    t0 = time.perf_counter()

    async def one(i: int, item: Any) -> RequestRecord:
        if offsets is not None:
            delay = t0 + float(offsets[i]) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        async with limit if limit is not None else contextlib.nullcontext():
            record = await send(item)
        if on_done is not None:
            on_done(record)
        return record

    return list(await asyncio.gather(*(one(i, item) for i, item in enumerate(items))))


class AsyncDriven(Baseline):
    """A baseline whose requests are independent coroutines; runs by concurrency or rate.

    All its runs share one event loop, so what :meth:`open` sets up (a gRPC channel, an
    engine's step loop) is warmed by the warm-up and reused by every measured run.
    """

    supports_rate = True
    request_rate: float = math.inf  # requests/s as a Poisson process; inf: by concurrency only
    seed: int = 0  # seeds the arrival process
    on_done: Callable[[RequestRecord], None] | None = None  # progress, per finished request
    _loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:  # noqa: B027 - optional: make per-event-loop resources
        """Called once, inside the event loop, before the first request."""

    async def shut(self) -> None:  # noqa: B027 - optional
        """Called once, inside the event loop, when the baseline is closed."""

    @abstractmethod
    async def send(self, prompt: list[int], output_len: int) -> RequestRecord:
        """Send one request and time it."""

    def run(
        self, prompts: list[list[int]], output_len: int | Sequence[int], concurrency: int
    ) -> list[RequestRecord]:
        """Run ``prompts``: at most ``concurrency`` in flight, arriving at ``request_rate``."""
        items = list(zip(prompts, output_lens(output_len, len(prompts))))
        offsets = None
        if not math.isinf(self.request_rate):
            offsets = arrival_offsets(len(prompts), self.request_rate, self.seed)
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.open())
        return self._loop.run_until_complete(
            drive(lambda item: self.send(*item), items, concurrency, offsets, self.on_done)
        )

    def close(self) -> None:
        """Run :meth:`shut` and close the event loop."""
        if self._loop is not None:
            loop, self._loop = self._loop, None
            try:
                loop.run_until_complete(self.shut())
            finally:
                loop.close()


class GrpcRunner(AsyncDriven):
    """The served model over gRPC: streamed Generate, or unary Classify / SampleImages calls."""

    name = "grpc"
    description = "engine serve over gRPC (grpc.aio streaming client, separate process)"

    def __init__(
        self,
        target: str,
        model: str,
        task: str = "generate",
        decode: Callable[[list[int]], str] | None = None,
        token: str | None = None,
        seed: int = 0,
    ):
        """``decode`` turns a prompt's ids into the text sent (classify, generate)."""
        self.target, self.model, self.task = target, model, task
        self.decode = decode
        self.seed = seed
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel: Any = None
        self._stub: Any = None

    async def open(self) -> None:
        """Connect (grpc.aio channels belong to one event loop); fail clearly if nobody answers."""
        self._channel = grpc.aio.insecure_channel(self.target)
        self._stub = engine_pb2_grpc.EngineServiceStub(self._channel)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise EngineError(f"no gRPC server answers at {self.target}") from None

    async def shut(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def send(self, prompt: list[int], output_len: int) -> RequestRecord:
        """One call, timed; a failed call gives a record with ``error`` set."""
        record = RequestRecord(start=time.perf_counter(), prompt_tokens=len(prompt))
        try:
            if self.task == "generate":
                params = sampling_params(temperature=0.0, max_tokens=output_len, ignore_eos=True)
                request = pb.GenerateRequest(
                    model=self.model, prompt=self.decode(prompt), params=params
                )
                record.start = time.perf_counter()
                async for chunk in self._stub.Generate(request, metadata=self._metadata):
                    # the server streams a token a chunk; k tokens in one chunk share its arrival
                    now = time.perf_counter()
                    record.token_times.extend([now] * len(chunk.token_ids))
                    record.token_ids.extend(chunk.token_ids)
                    if chunk.usage.prompt_tokens:
                        record.prompt_tokens = int(chunk.usage.prompt_tokens)
            elif self.task == "classify":
                request = pb.ClassifyRequest(model=self.model, texts=[self.decode(prompt)])
                record.start = time.perf_counter()
                await self._stub.Classify(request, metadata=self._metadata)
                record.token_times.append(time.perf_counter())
            else:  # sample_images: the prompt is [digit]
                request = pb.SampleImagesRequest(model=self.model, digits=prompt, seed=self.seed)
                record.prompt_tokens = 0
                record.start = time.perf_counter()
                await self._stub.SampleImages(request, metadata=self._metadata)
                record.token_times.append(time.perf_counter())
        except grpc.aio.AioRpcError as exc:
            record.error = f"{exc.code().name}: {exc.details()}"
        return record

    def describe(self) -> dict[str, Any]:
        """Target, model and grpcio version."""
        return {**super().describe(), "target": self.target, "grpcio": grpc.__version__}
