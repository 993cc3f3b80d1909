"""The generate engine: vLLM v1's step loop (schedule -> execute -> update) plus an async API.

``LLMEngine.step()`` runs one batch and returns each progressed request's output;
``async for out in engine.generate(prompt, params)`` streams one request while a background task
steps the engine for every request in flight. Loading never imports torch.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.runtime.backends import BackendOptions
from engine.runtime.detokenizer import CONTEXT_TOKENS, IncrementalDetokenizer
from engine.runtime.errors import (
    BackendUnavailableError,
    InvalidPromptError,
    ModelSignatureError,
)
from engine.runtime.kv_cache import KVCacheManager, KVCacheSpec, KVCacheStats
from engine.runtime.loader import ModelVersion, open_version
from engine.runtime.model_runner import InplaceGraph, ModelRunner
from engine.runtime.request import Request, RequestStatus
from engine.runtime.sampler import SamplerOutput
from engine.runtime.sampling_params import SamplingParams
from engine.runtime.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

INPLACE_VARIANT = "kv_inplace"
TORCH_FORMAT = "torch"  # versions of this format run on engine/runtime/torch_runner.py


@dataclass
class Usage:
    """Token counts of one request, as OpenAI reports them."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion."""
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenLogprob:
    """The sampled token's logprob and the top alternatives (raw model distribution)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one step produced for one request: a text delta and the tokens behind it."""

    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    text: str  # all text so far (stop string excluded)
    token_ids: list[int]  # all output tokens so far
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort"
    stop_reason: int | str | None  # the stop token id or stop string, when one matched
    usage: Usage
    logprobs: list[TokenLogprob] | None = None

    def merged(self, later: RequestOutput) -> RequestOutput:
        """This output followed by ``later`` (of the same request) as one output."""
        logprobs = self.logprobs
        if later.logprobs is not None:
            logprobs = (logprobs or []) + later.logprobs
        return RequestOutput(
            self.request_id,
            self.delta_text + later.delta_text,
            self.delta_token_ids + later.delta_token_ids,
            later.text,
            later.token_ids,
            later.finished,
            later.finish_reason,
            later.stop_reason,
            later.usage,
            logprobs,
        )


@dataclass(frozen=True)
class EngineConfig:
    """Runtime limits; defaults fit the tiny LM on 2 CPU cores."""

    max_num_seqs: int = 16
    max_model_len: int | None = None  # None: the model's context length
    max_num_batched_tokens: int | None = None  # None: max(max_model_len, 2048)
    kv_cache_bytes: int | None = None  # None: max_num_seqs full-context sequences
    io_binding: bool = True
    # torch-format versions only (engine/runtime/torch_runner.py):
    dtype: str | None = None  # float32, float16, bfloat16; None: float16 on CUDA, float32 on CPU
    cuda_graphs: bool = True  # capture decode steps as CUDA graphs (on CUDA devices)
    # The async loop runs the graph in a worker thread (onnxruntime releases the GIL), so a
    # server's event loop keeps answering while a step computes; scheduling stays on the loop.
    execute_in_thread: bool = False


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
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._slots: dict[str, int] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop_task: asyncio.Task | None = None
        self._ids = itertools.count()
        self.num_steps = 0
        self.num_generated_tokens = 0

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
        if _serves_with_torch(mv, backend):
            spec, make_runner = _torch_runner(mv, max_len, device, threads, config)
        else:
            spec, make_runner = _onnx_runner(mv, max_len, device, backend, threads, spin, config)
        budget = config.kv_cache_bytes or spec.bytes_per_token * max_len * config.max_num_seqs
        # One slot per sequence (block_size = max_model_len): the graph reads a row per sequence.
        # Slots beyond max_num_seqs could never run at once, so the pool stops there.
        kv = KVCacheManager.from_budget(budget, spec, block_size=max_len)
        kv = KVCacheManager(min(kv.num_blocks, config.max_num_seqs), max_len, kv.bytes_per_block)
        sched_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens or max(max_len, 2048),
            max_model_len=max_len,
        )
        runner = make_runner(kv.num_blocks)
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
        self.scheduler.add_request(request)
        self._detok[request_id] = self._detokenizer(ids, params.stop)
        return request_id

    def _detokenizer(self, prompt_ids: list[int], stop: Sequence[str]) -> IncrementalDetokenizer:
        """A detokenizer on ``tokenizers``' DecodeStream where it exists (one Rust call a token)."""
        try:
            from tokenizers.decoders import DecodeStream

            context = prompt_ids[-CONTEXT_TOKENS:]
            stream = DecodeStream(ids=context, skip_special_tokens=True)
            step = functools.partial(stream.step, self.tokenizer)
        except (ImportError, TypeError):  # tokenizers < 0.21, or without the ids argument
            step = None
        return IncrementalDetokenizer(self.tokenizer.decode, stop, prompt_ids, step)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its memory is freed now and its stream ends with ``abort``."""
        request = self.scheduler.abort(request_id)
        if request is not None:
            self._emit([self._finished_output(request, "")])

    @property
    def has_unfinished(self) -> bool:
        """True while any request waits or runs."""
        return self.scheduler.has_unfinished

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, execute and update once; return the outputs of the requests that moved."""
        out, slots = self._schedule()
        if out is None:
            return []
        return self._update(out, self.runner.execute(out, slots))

    async def step_async(self) -> list[RequestOutput]:
        """One step with the graph run in a worker thread (if configured) off the event loop."""
        out, slots = self._schedule()
        if out is None:
            return []
        if self.config.execute_in_thread:
            sampled = await asyncio.to_thread(self.runner.execute, out, slots)
        else:
            sampled = self.runner.execute(out, slots)
        return self._update(out, sampled)

    def _schedule(self) -> tuple[SchedulerOutput | None, np.ndarray]:
        out = self.scheduler.schedule()
        ended = out.finished_ids + out.preempted_ids
        gone = [self._slots.pop(rid) for rid in ended if rid in self._slots]
        if gone:
            self.runner.release(np.array(gone, np.int64))
        requests = out.requests
        if not requests:
            return None, np.zeros(0, np.int64)
        for r in out.prefill:
            self._slots[r.request_id] = self.scheduler.kv.block_ids(r.request_id)[0]
        slots = np.fromiter((self._slots[r.request_id] for r in requests), np.int64, len(requests))
        return out, slots

    def _update(self, out: SchedulerOutput, sampled: SamplerOutput) -> list[RequestOutput]:
        requests = out.requests
        token_ids = sampled.token_ids.tolist()
        live = [not r.is_finished for r in requests]  # an abort may land while a step runs
        self.scheduler.update(out, token_ids)
        self.num_steps += 1
        self.num_generated_tokens += sum(live)
        rows = [i for i, ok in enumerate(live) if ok]
        detoks = [self._detok[requests[i].request_id] for i in rows]
        deltas = [d.add(token_ids[i]) for d, i in zip(detoks, rows)]
        outputs = []
        for i, delta in zip(rows, deltas):
            outputs.append(self._output(requests[i], token_ids[i], delta, sampled, i))
        self._emit(outputs)
        return outputs

    def _output(self, r: Request, token: int, delta: str, sampled: SamplerOutput, row: int):
        detok = self._detok[r.request_id]
        if detok.stopped_on is not None:
            if r.is_finished:  # a stop string wins over a length limit reached by the same token
                r.status, r.stop_reason = RequestStatus.FINISHED_STOPPED, detok.stopped_on
            else:
                stopped = RequestStatus.FINISHED_STOPPED
                self.scheduler.finish(r.request_id, stopped, detok.stopped_on)
        if r.is_finished:
            delta += detok.flush()
            del self._detok[r.request_id]
        logprobs = None
        if r.params.logprobs is not None and sampled.logprobs is not None:
            top = []
            if r.params.logprobs and sampled.top_token_ids is not None:
                n = r.params.logprobs
                ids, lps = sampled.top_token_ids[row, :n], sampled.top_logprobs[row, :n]
                top = list(zip(ids.tolist(), lps.tolist()))
            logprobs = [TokenLogprob(token, float(sampled.logprobs[row]), top)]
        return RequestOutput(
            r.request_id,
            delta,
            [token],
            detok.output_text,
            list(r.output_token_ids),
            r.is_finished,
            r.finish_reason,
            r.stop_reason,
            Usage(r.num_prompt_tokens, r.num_output_tokens),
            logprobs,
        )

    def _finished_output(self, r: Request, delta: str) -> RequestOutput:
        detok = self._detok.pop(r.request_id, None)
        text = detok.output_text if detok else ""
        usage = Usage(r.num_prompt_tokens, r.num_output_tokens)
        tokens, reason = list(r.output_token_ids), r.finish_reason
        return RequestOutput(r.request_id, delta, [], text, tokens, True, reason, None, usage)

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
    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; leaving the loop early aborts the request."""
        request_id = self.add_request(prompt, params, request_id)
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
            if request_id in self.scheduler.requests:
                self.abort(request_id)

    def _emit(self, outputs: list[RequestOutput]) -> None:
        for o in outputs:
            queue = self._queues.get(o.request_id)
            if queue is not None:
                queue.put_nowait(o)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def _run_loop(self) -> None:
        """Step while anything is in flight, yielding to the event loop between steps."""
        try:
            while self.has_unfinished:
                await self.step_async()
                await asyncio.sleep(0)  # let the streams and new requests in between steps
        except Exception as exc:  # fail every stream rather than hang them
            for rid in list(self.scheduler.requests):
                self.scheduler.abort(rid)
            for queue in self._queues.values():
                queue.put_nowait(exc)

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
            "kv_slots": stats.num_blocks,
            "kv_cache_bytes": self.runner.kv_bytes,
            "kv_peak_bytes": stats.peak_bytes,
            "preemptions": stats.preemptions,
        }

    def close(self) -> None:
        """Release the graph (or the torch runner's memory)."""
        release = getattr(self.runner, "close", None)
        if release is not None:
            release()
        self.model.close()


def _serves_with_torch(mv: ModelVersion, backend: str | None) -> bool:
    """True for a ``torch``-format version; a backend that cannot load the format is an error."""
    fmt = mv.manifest.format
    if fmt == TORCH_FORMAT:
        if backend not in (None, TORCH_FORMAT):
            raise BackendUnavailableError(
                f"{mv.path} holds torch weights, which only the torch backend runs "
                f"(not {backend!r}); export with --format onnx for other backends"
            )
        return True
    if backend == TORCH_FORMAT:
        raise BackendUnavailableError(
            f"{mv.path} holds {fmt or 'onnx'} graphs, not torch weights; export the checkpoint "
            "with --format torch for the torch backend"
        )
    return False


RunnerFactory = Callable[[int], Any]  # number of KV slots -> a runner


def _onnx_runner(
    mv: ModelVersion,
    max_len: int,
    device: str,
    backend: str | None,
    threads: int | None,
    spin: bool,
    config: EngineConfig,
) -> tuple[KVCacheSpec, RunnerFactory]:
    """The KV shape of the ``kv_inplace`` graph and a factory of its :class:`ModelRunner`."""
    serving = mv.serving
    graph = InplaceGraph.from_manifest(mv.graph(INPLACE_VARIANT))
    itemsize = np.dtype(graph.dtype).itemsize
    spec = KVCacheSpec(len(graph.kv) // 2, graph.num_heads, graph.head_dim, itemsize)

    def make(num_slots: int) -> ModelRunner:
        options = BackendOptions(device=device, intra_op_threads=threads, spin=spin)
        return ModelRunner(
            mv.load(INPLACE_VARIANT, options, backend),
            graph,
            num_slots,
            max_len,
            int(serving["vocab_size"]),
            int(serving.get("pad_token_id", 0)),
            config.io_binding,
        )

    return spec, make


def _torch_runner(
    mv: ModelVersion, max_len: int, device: str, threads: int | None, config: EngineConfig
) -> tuple[KVCacheSpec, RunnerFactory]:
    """The KV shape in the chosen dtype and a factory of the :class:`TorchRunner`."""
    from engine.runtime import torch_runner  # the only import of torch on the serving side

    dtype = torch_runner.resolve_dtype(config.dtype, torch_runner.resolve_device(device))

    def make(num_slots: int) -> Any:
        return torch_runner.TorchRunner.from_version(
            mv,
            num_slots,
            max_len,
            device=device,
            dtype=config.dtype,
            threads=threads,
            cuda_graphs=config.cuda_graphs,
        )

    return torch_runner.kv_spec(mv.serving, dtype), make
