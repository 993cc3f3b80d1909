"""The engine in this process: ``LLMEngine``'s async API, no gRPC, so the gap is server overhead.

Loaded as the server loads it (``Engine.from_repository`` with the same threads and default
``EngineConfig``), driven by the same load generator as the gRPC runner.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.baselines.base import RequestRecord, Unavailable
from bench.loadgen import AsyncDriven


class InProcessBaseline(AsyncDriven):
    """``engine.generate(prompt_ids, SamplingParams(temperature=0, ignore_eos=True))``."""

    name = "inprocess"
    description = "LLMEngine async API in the bench process (no gRPC, no server)"

    def __init__(
        self,
        repo: Path,
        model: str,
        threads: int | None = None,
        seed: int = 0,
        device: str = "cpu",
        dtype: str | None = None,
        cuda_graphs: bool = True,
        max_num_seqs: int | None = None,
        gpu_memory_utilization: float | None = None,
    ):
        """Load ``model`` from ``repo`` on ``device`` with the server's engine settings."""
        from engine.runtime import Engine, EngineConfig

        self.seed, self.threads, self.device = seed, threads, device
        config = EngineConfig(
            dtype=dtype,
            cuda_graphs=cuda_graphs,
            gpu_memory_utilization=gpu_memory_utilization,
            **({"max_num_seqs": max_num_seqs} if max_num_seqs else {}),
        )
        self.engine = Engine.from_repository(
            repo, model, device=device, threads=threads, config=config
        )
        if self.engine.model.task != "generate":
            self.engine.close()
            raise Unavailable(f"model {model!r} does not generate text")

    async def send(self, prompt: list[int], output_len: int) -> RequestRecord:
        """One streamed generation, timed per token."""
        from engine.runtime import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        record = RequestRecord(start=time.perf_counter(), prompt_tokens=len(prompt))
        try:
            async for out in self.engine.generate(prompt, params):
                now = time.perf_counter()
                record.token_times.extend([now] * len(out.delta_token_ids))
                record.token_ids.extend(out.delta_token_ids)
        except Exception as exc:  # a failed request is a result, not a crash of the bench
            record.error = f"{type(exc).__name__}: {exc}"
        return record

    def describe(self) -> dict[str, Any]:
        """The engine's limits and KV pool."""
        return {
            **super().describe(),
            "device": self.device,
            "threads": self.threads,
            "engine": self.engine.describe(),
        }

    def close(self) -> None:
        """Close the event loop, then release the graph."""
        super().close()
        self.engine.close()
