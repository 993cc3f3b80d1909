"""The bare numpy + onnxruntime greedy loop (bench/bare_loop.py) over the ``default`` graph.

``concurrency`` prompts run as one batch, batch after batch; every request of a batch starts
when the batch does and shares the batch's per-step token times.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.bare_loop import greedy, load_session
from bench.baselines.base import BatchedBaseline, Unavailable


class BareLoopBaseline(BatchedBaseline):
    """No scheduler, no preallocation: the loop every engine feature is measured against."""

    name = "bare"
    description = "bare numpy + onnxruntime greedy loop, default graph, static batches"

    def __init__(self, repo: Path, model: str, threads: int | None = None, device: str = "cpu"):
        """Open ``model``'s default graph with ``threads`` intra-op threads (default: per core)."""
        from engine.runtime.loader import open_version

        if device != "cpu":
            raise Unavailable(f"the bare loop runs on the CPU only, not {device!r}")
        mv = open_version(repo, model)
        self.threads = threads or os.cpu_count() or 1  # the server's default: one per core
        self.pad_id = int(mv.serving.get("pad_token_id", 0))
        self.context = int(mv.serving["context_length"])
        self.session = load_session(mv.path / mv.graph("default")["file"], self.threads)

    def generate_batch(
        self, prompts: list[list[int]], output_len: int
    ) -> tuple[list[float], np.ndarray]:
        """One left-padded batch through the bare loop: each step's time and the tokens."""
        times: list[float] = []
        tokens = greedy(
            self.session, prompts, output_len, self.pad_id, _stamper(times), self.context
        )
        return times, tokens

    def describe(self) -> dict[str, Any]:
        """Threads and onnxruntime version."""
        import onnxruntime

        return {
            **super().describe(),
            "threads": self.threads,
            "onnxruntime": onnxruntime.__version__,
        }


def _stamper(times: list[float]):
    """An ``on_step`` callback that appends the time each step's tokens exist."""
    return lambda _step: times.append(time.perf_counter())
