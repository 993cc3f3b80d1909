"""The generate engine: vLLM v1's step loop (schedule -> execute -> update).

``LLMEngine.step()`` runs one batch and returns each progressed request's output. The other
jobs live next door: ``outputs`` (detokenizing, stop strings, RequestOutput), ``runners``
(which runner serves a version), ``async_engine`` (the streams behind ``engine.generate``).
Loading never imports torch unless the version is in the torch format.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.runtime.async_engine import AsyncFront
from engine.runtime.errors import InvalidPromptError, ModelSignatureError
from engine.runtime.kv_cache import KVCacheManager, KVCacheStats
from engine.runtime.loader import ModelVersion, open_version
from engine.runtime.model_runner import ModelRunner
from engine.runtime.outputs import OutputProcessor, RequestOutput
from engine.runtime.request import Request
from engine.runtime.runners import free_memory, kv_budget, runner_factory
from engine.runtime.sampler import SamplerOutput
from engine.runtime.sampling_params import SamplingParams
from engine.runtime.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


@dataclass(frozen=True)
class EngineConfig:
    """Runtime limits; defaults fit the tiny LM on 2 CPU cores."""

    max_num_seqs: int = 16
    max_model_len: int | None = None  # None: the model's context length
    max_num_batched_tokens: int | None = None  # None: max(max_model_len, 2048)
    kv_cache_bytes: int | None = None  # None: max_num_seqs full-context sequences
    # Or: this fraction of the device memory free once the weights are loaded (CUDA, torch
    # format). vLLM's flag of the same name takes a fraction of the whole device instead.
    gpu_memory_utilization: float | None = None
    # Keep computed prompt blocks and reuse them for prompts that start the same way (a
    # system prompt, a few-shot header): never slower (a hit is a block copy instead of
    # recomputing its tokens), and greedy outputs are identical either way (tested).
    enable_prefix_caching: bool = True
    io_binding: bool = True
    # torch-format versions only (engine/runtime/torch_runner.py):
    dtype: str | None = None  # float32, float16, bfloat16; None: float16 on CUDA, float32 on CPU
    cuda_graphs: bool = True  # capture decode steps as CUDA graphs (on CUDA devices)


class LLMEngine:
    """Continuous batching over a ``kv_inplace`` decoder graph."""

    def __init__(
        self,
        model: ModelVersion,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer: Any,
        config: EngineConfig | None = None,
    ):
        self.model, self.runner, self.scheduler = model, runner, scheduler
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        serving = model.serving
        self.eos_token_id = serving.get("eos_token_id")
        self.vocab_size = int(serving["vocab_size"])
        self.max_model_len = scheduler.config.max_model_len
        self.outputs = OutputProcessor(tokenizer, scheduler.finish)
        self.front = AsyncFront(self)
        self._slots: dict[str, int] = {}  # request -> its row of decode state in the runner
        self._free_slots = list(range(scheduler.config.max_num_seqs))  # a heap: lowest first
        self._ids = itertools.count()
        self.num_steps = 0
        # The async front steps in its own thread while callers add and abort requests: the
        # lock guards the scheduler and outputs (held for scheduling and updating, not while the
        # graph runs); the step lock keeps two steps from ever overlapping.
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_repository(
        cls, repo: Path | str, model: str | None = None, version: int | None = None, **kwargs: Any
    ) -> LLMEngine:
        """Verify and load ``repo/model/version`` (default: latest); see :meth:`from_version`."""
        return cls.from_version(open_version(repo, model, version), **kwargs)

    @classmethod
    def from_version(
        cls,
        mv: ModelVersion,
        *,
        device: str = "cpu",
        backend: str | None = None,
        threads: int | None = None,
        config: EngineConfig | None = None,
        spin: bool = True,
    ) -> LLMEngine:
        """Build the engine for a verified model version whose task is ``generate``.

        A ``torch``-format version (or ``backend="torch"``) runs on :class:`TorchRunner`, on
        ``device`` cpu or cuda; only then is torch imported.
        """
        from tokenizers import Tokenizer

        config = config or EngineConfig()
        if mv.task != "generate":
            raise ModelSignatureError(f"model {mv.name!r} serves {mv.task!r}, not 'generate'")
        serving = mv.serving
        context = int(serving["context_length"])
        max_len = min(config.max_model_len or context, context)
        factory = runner_factory(
            mv, max_len, config, device=device, backend=backend, threads=threads, spin=spin
        )
        spec = factory.spec
        budget = kv_budget(config, spec, max_len, free_memory(mv, device, backend))
        # Blocks of block_size tokens: a sequence holds what its tokens need. More blocks than
        # max_num_seqs full contexts could never be used at once, so the pool stops there.
        per_seq = -(-max_len // factory.block_size)
        num_blocks = min(
            KVCacheManager.blocks_in_budget(budget, spec, factory.block_size),
            per_seq * config.max_num_seqs,
        )
        slots = config.max_num_seqs
        if not factory.paged:  # whole-context rows: the budget buys rows, prefixes not cached
            slots = max(1, min(slots, num_blocks // per_seq))
            num_blocks = slots * per_seq
        kv = KVCacheManager(
            num_blocks,
            factory.block_size,
            spec.bytes_per_token * factory.block_size,
            enable_prefix_caching=config.enable_prefix_caching and factory.paged,
        )
        sched_config = SchedulerConfig(
            max_num_seqs=slots,
            max_num_batched_tokens=config.max_num_batched_tokens or max(max_len, 2048),
            max_model_len=max_len,
        )
        runner = factory.build(slots, kv.num_blocks)
        kv.enable_prefix_caching &= runner.supports_prefix_caching
        tokenizer = Tokenizer.from_file(str(mv.path / serving.get("tokenizer", "tokenizer.json")))
        return cls(mv, runner, Scheduler(sched_config, kv), tokenizer, config)

    # -- requests -------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt; an empty prompt starts from end-of-text, as GPT-2 does."""
        ids = self.tokenizer.encode(prompt).ids if isinstance(prompt, str) else list(prompt)
        if not ids and self.eos_token_id is not None:
            ids = [int(self.eos_token_id)]
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise InvalidPromptError(f"prompt token ids must be in [0, {self.vocab_size})")
        return ids

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a prompt (text or token ids); return its request id. Raises for bad input."""
        params = (params or SamplingParams()).validate(self.vocab_size)
        request_id = request_id or f"req-{next(self._ids)}"
        ids = self.encode(prompt)
        request = Request(request_id, ids, params, eos_token_id=self.eos_token_id)
        with self._lock:
            self.scheduler.add_request(request)
            self.outputs.add(request)
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request; its memory is freed now and its stream ends with ``abort``."""
        with self._lock:
            request = self.scheduler.abort(request_id)
            if request is None:
                return
            out = self.outputs.finished_output(request)
        self.front.emit([out])

    def drop_all(self) -> None:
        """End every unfinished request without an output (the caller says why); frees memory."""
        with self._lock:
            for request_id in list(self.scheduler.requests):
                self.scheduler.abort(request_id)
                self.outputs.discard(request_id)

    @property
    def has_unfinished(self) -> bool:
        """True while any request waits or runs."""
        return self.scheduler.has_unfinished

    # -- the step -----------------------------------------------------------------------------
    def step(
        self, emit: Callable[[list[RequestOutput]], None] | None = None
    ) -> list[RequestOutput]:
        """Schedule, execute and update once; return the outputs of the requests that moved.

        With ``emit``, a step that both admits requests and decodes running ones hands the new
        requests' first tokens to ``emit`` as soon as their prefill is sampled, before the
        decode graph runs: a request's time to first token then skips the batch's decode.
        Safe to call while other threads add or abort requests: a request aborted while the
        graph runs gets no output from this step.
        """
        with self._step_lock:
            with self._lock:
                out, slots = self._schedule()
            if out is None:
                return []
            if emit is not None and out.prefill and out.decode:
                n = len(out.prefill)
                first = SchedulerOutput(prefill=out.prefill)
                sampled = self.runner.execute(first, slots[:n])  # the GIL is released meanwhile
                with self._lock:
                    outputs = self._update(first, sampled, new_step=False)
                if outputs:
                    emit(outputs)
                out, slots = SchedulerOutput(decode=out.decode), slots[n:]
            sampled = self.runner.execute(out, slots)
            with self._lock:
                return self._update(out, sampled)

    def _schedule(self) -> tuple[SchedulerOutput | None, np.ndarray]:
        out = self.scheduler.schedule()
        ended = out.finished_ids + out.preempted_ids
        gone = [self._slots.pop(rid) for rid in ended if rid in self._slots]
        if gone:
            self.runner.release(np.array(gone, np.int64))
            for slot in gone:
                heapq.heappush(self._free_slots, slot)
        for r in out.prefill:
            self._slots[r.request_id] = heapq.heappop(self._free_slots)
        kv = self.scheduler.kv
        # Blocks the manager handed out, and copies it queued (prefix hits, cached blocks
        # moved aside), reach the runner before the step computes.
        for rid, blocks in kv.take_grown().items():
            self.runner.assign_blocks(self._slots[rid], blocks)
        copies = kv.take_copies()
        if copies:
            self.runner.copy_blocks(copies)
        requests = out.requests
        if not requests:
            return None, np.zeros(0, np.int64)
        slots = np.fromiter((self._slots[r.request_id] for r in requests), np.int64, len(requests))
        return out, slots

    def _update(
        self, out: SchedulerOutput, sampled: SamplerOutput, new_step: bool = True
    ) -> list[RequestOutput]:
        requests = out.requests
        token_ids = sampled.token_ids.tolist()
        self.scheduler.update(out, token_ids)
        self.num_steps += new_step
        return self.outputs.step_outputs(requests, token_ids, sampled)

    # -- synchronous convenience -------------------------------------------------------------------
    def generate_all(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Run prompts to completion together; return each one's final output, in order."""
        ids = [self.add_request(p, params) for p in prompts]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished:
            for o in self.step():
                if o.finished:
                    final[o.request_id] = o
        return [final[i] for i in ids]

    # -- async API ---------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs (``async for``); leaving the loop early aborts it."""
        return self.front.generate(prompt, params, request_id)

    # -- introspection -----------------------------------------------------------------------------
    def kv_stats(self) -> KVCacheStats:
        """KV-cache usage counters (used, free, peak, preemptions)."""
        return self.scheduler.kv.stats()

    def describe(self) -> dict[str, Any]:
        """Model, limits and memory, for the CLI and metrics."""
        stats = self.kv_stats()
        return {
            "model": self.model.name,
            "version": self.model.version,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.scheduler.config.max_num_seqs,
            "kv_blocks": stats.num_blocks,
            "kv_block_size": stats.block_size,
            "kv_cache_bytes": self.runner.kv_bytes,
            "runner": type(self.runner).__name__,
            "dtype": str(getattr(self.runner, "dtype", None) or self.runner.graph.dtype).replace(
                "torch.", ""
            ),
            "cuda_graphs": getattr(self.runner, "num_graphs", 0),
            "kv_peak_bytes": stats.peak_bytes,
            "preemptions": stats.preemptions,
            "prefix_caching": self.scheduler.kv.enable_prefix_caching,
            "prefix_cache_queries": stats.prefix_queries,
            "prefix_cache_hits": stats.prefix_hits,
        }

    def close(self) -> None:
        """Stop the step thread and release the graph (or the torch runner's memory)."""
        self.front.close()
        release = getattr(self.runner, "close", None)
        if release is not None:
            release()
        self.model.close()
