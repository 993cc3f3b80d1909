"""What every generate baseline (and the gRPC driver) reports: one record per request.

A baseline runs a list of token-id prompts at a given concurrency and returns, for each request,
when it was sent and when each of its output tokens arrived (``time.perf_counter()`` seconds).
Batched baselines (a bare loop, Hugging Face ``generate``) run ``concurrency`` prompts as one
batch, batch after batch; every request of a batch then shares the batch's token timestamps.
The metrics (TTFT, TPOT, ITL, E2E) are computed from these records alone, the same way for all.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
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
        self, prompts: list[list[int]], output_len: int, concurrency: int
    ) -> list[RequestRecord]:
        """Generate exactly ``output_len`` greedy tokens per prompt (end-of-text ignored)."""

    def describe(self) -> dict[str, Any]:
        """Versions and settings that go into the JSON report."""
        return {"name": self.name, "description": self.description}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free what the baseline holds (sessions, models, servers)."""


class BatchedBaseline(Baseline):
    """A baseline that runs static batches: ``concurrency`` prompts at once, batch after batch.

    Every request of a batch starts when the batch does and shares its per-step token times.
    """

    supports_rate = False  # no arrival process: a batch is formed before it starts
    on_done: Callable[[RequestRecord], None] | None = None  # progress, per finished request

    @abstractmethod
    def generate_batch(
        self, prompts: list[list[int]], output_len: int
    ) -> tuple[list[float], np.ndarray]:
        """Greedy ``output_len`` tokens for one batch: each step's time and the (B, n) tokens."""

    def run(
        self, prompts: list[list[int]], output_len: int, concurrency: int
    ) -> list[RequestRecord]:
        """Batches of ``concurrency`` prompts, one after the other."""
        records: list[RequestRecord] = []
        for i in range(0, len(prompts), concurrency):
            batch = prompts[i : i + concurrency]
            start = time.perf_counter()
            times, tokens = self.generate_batch(batch, output_len)
            done = [
                RequestRecord(start, list(times), len(p), tokens[row].tolist())
                for row, p in enumerate(batch)
            ]
            records += done
            for record in done if self.on_done is not None else ():
                self.on_done(record)
        return records
