"""What every generate baseline (and the gRPC driver) reports: one record per request.

A baseline runs a list of token-id prompts, each with the number of tokens it asks for, at a
given concurrency and returns, for each request, when it was sent and when each of its output
tokens arrived (``time.perf_counter()`` seconds). Batched baselines (a bare loop, Hugging Face
``generate``) serve requests as a static-batch server would: ``concurrency`` of them left-padded
into one batch that runs until its longest request is done; requests sent meanwhile wait for the
next batch. The metrics (TTFT, TPOT, ITL, E2E) are computed from these records alone, the same
way for all.
"""

from __future__ import annotations

import bisect
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Unavailable(Exception):
    """A baseline cannot run here (a package or device is missing); the message says which."""


@dataclass
class RequestRecord:
    """Timestamps of one request; ``token_times[i]`` is when output token i arrived."""

    start: float
    token_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # the output, to compare baselines by
    error: str | None = None  # set when the request failed; it then counts as failed

    @property
    def output_tokens(self) -> int:
        """Output tokens received."""
        return len(self.token_times)


class Baseline(ABC):
    """A way to generate: the server through gRPC, the engine in process, HF, a bare loop."""

    name: str  # short, stable: "grpc", "inprocess", "bare", "hf", "optimum"
    description: str = ""

    def check(self) -> None:  # noqa: B027 - optional: most baselines can always run
        """Raise :class:`Unavailable` with the reason if this baseline cannot run here."""

    @abstractmethod
    def run(
        self, prompts: list[list[int]], output_len: int | Sequence[int], concurrency: int
    ) -> list[RequestRecord]:
        """Generate exactly ``output_len`` greedy tokens per prompt (end-of-text ignored).

        ``output_len`` is one length for all, or one per prompt.
        """

    def describe(self) -> dict[str, Any]:
        """Versions and settings that go into the JSON report."""
        return {"name": self.name, "description": self.description}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free what the baseline holds (sessions, models, servers)."""


def output_lens(output_len: int | Sequence[int], count: int) -> list[int]:
    """One output length per request from a single length or a per-request list."""
    if isinstance(output_len, int):
        return [output_len] * count
    lens = [int(n) for n in output_len]
    if len(lens) != count:
        raise ValueError(f"{len(lens)} output lengths for {count} prompts")
    return lens


class BatchedBaseline(Baseline):
    """A static-batch server: up to ``concurrency`` requests per batch, batch after batch.

    A batch takes the requests sent by the time it starts (left-padded), runs until its
    longest request has all its tokens, and only then does the next batch start. Each request
    streams its own tokens (the batch's step times, cut at its own length), and its clients
    behave as the async load generator's: at a fixed concurrency a client sends its next
    request as soon as its last token arrives; with a ``request_rate`` requests are sent at
    their Poisson arrival times. A request's TTFT thus includes the wait for the batch before.
    """

    supports_rate = True
    request_rate: float = math.inf  # requests/s as a Poisson process; inf: by concurrency only
    seed: int = 0  # seeds the arrival process
    on_done: Callable[[RequestRecord], None] | None = None  # progress, per finished request

    @abstractmethod
    def generate_batch(
        self, prompts: list[list[int]], output_len: int
    ) -> tuple[list[float], np.ndarray]:
        """Greedy ``output_len`` tokens for one batch: each step's time and the (B, n) tokens."""

    def run(
        self, prompts: list[list[int]], output_len: int | Sequence[int], concurrency: int
    ) -> list[RequestRecord]:
        """Serve ``prompts`` in static batches of at most ``concurrency``."""
        from bench.loadgen import arrival_offsets

        lens = output_lens(output_len, len(prompts))
        n = len(prompts)
        t0 = time.perf_counter()
        arrive = t0 + (
            arrival_offsets(n, self.request_rate, self.seed)
            if not math.isinf(self.request_rate)
            else np.zeros(n)
        )
        limit = concurrency if math.isinf(self.request_rate) else None
        finished: list[float] = []  # finish times, sorted: a closed-loop client sends then
        records: list[RequestRecord | None] = [None] * n
        sent = [0.0] * n
        nxt = 0
        while nxt < n:
            now = time.perf_counter()
            batch = []
            while nxt + len(batch) < n and len(batch) < concurrency:
                i = nxt + len(batch)
                at = float(arrive[i])
                if limit is not None and i >= limit:  # waits for a client to be free
                    freed = i - limit  # the (i - limit)-th finish, in time order
                    if freed >= len(finished):
                        break
                    at = max(at, finished[freed])
                if at > now:
                    break
                sent[i] = at
                batch.append(i)
            if not batch:
                wait = float(arrive[nxt]) - time.perf_counter()
                time.sleep(max(wait, 0.0))
                continue
            longest = max(lens[i] for i in batch)
            times, tokens = self.generate_batch([prompts[i] for i in batch], longest)
            for row, i in enumerate(batch):
                k = lens[i]
                ids = tokens[row, :k].tolist()
                record = RequestRecord(sent[i], list(times[:k]), len(prompts[i]), ids)
                records[i] = record
                bisect.insort(finished, record.token_times[-1])
                if self.on_done is not None:
                    self.on_done(record)
            nxt += len(batch)
        return [r for r in records if r is not None]
