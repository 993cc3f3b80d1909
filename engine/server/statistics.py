"""Per-version inference statistics, as Triton's ModelStatistics reports them.

The server counts what it sees of each request (success or failure and its duration, the wait
for an admission slot, the time the model held it, items inferred); the runtime counts its own
executions (batches per size and their time, engine steps). :func:`triton_stats` joins both into
the message. Counters start at zero when a version is loaded and go when it is unloaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from engine.server.models import ModelStats


@dataclass
class Duration:
    """A count and its total time in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        """Count ``count`` more taking ``seconds`` in all."""
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class VersionStats:
    """What the server measured of one loaded model version's requests."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)  # waiting for an admission slot
    compute: Duration = field(default_factory=Duration)  # holding the slot (model at work)
    inference_count: int = 0  # items: texts, digits or prompts of successful requests
    last_inference_ms: int = 0

    def finished(self, ok: bool, seconds: float) -> None:
        """Count one request that ended (well or not) after ``seconds``."""
        (self.success if ok else self.fail).add(seconds)
        self.last_inference_ms = int(time.time() * 1000)


def triton_stats(pb: Any, name: str, version: int, server: VersionStats, runtime: ModelStats):
    """Triton's ``ModelStatistics`` message for one version (``pb``: the generated module)."""
    message = pb.ModelStatistics(
        name=name,
        version=str(version),
        last_inference=server.last_inference_ms,
        inference_count=server.inference_count,
        # one backend call per batch (classify, sample_images) or one engine step (generate)
        execution_count=sum(runtime.batch_sizes.values()) or runtime.steps,
    )
    stats = message.inference_stats
    for target, source in (
        (stats.success, server.success),
        (stats.fail, server.fail),
        (stats.queue, server.queue),
        (stats.compute_infer, server.compute),
    ):
        target.count, target.ns = source.count, source.ns
    for size in sorted(runtime.batch_sizes):
        batch = message.batch_stats.add(batch_size=size)
        batch.compute_infer.count = runtime.batch_sizes[size]
        batch.compute_infer.ns = runtime.batch_ns.get(size, 0)
    return message
