"""The continuous-batching scheduler: which requests run this step, and with how many tokens.

vLLM v1's loop: ``schedule()`` -> the model runner executes -> ``update()`` with the sampled
tokens. The scheduler holds no tensors; it moves :class:`Request` objects between a waiting
queue and a running list and asks the :class:`KVCacheManager` for memory.

Policy: FCFS. Running requests decode first, oldest first; each holds KV blocks for the tokens
it has and takes one more block every ``block_size`` tokens. If one cannot grow, the newest
running request is preempted (its blocks freed - the full ones stay in the prefix cache - and
its progress kept as tokens) and goes to the front of the waiting queue, to be recomputed by a
prefill when memory allows (mostly from the prefix cache, if its blocks were not reclaimed
meanwhile). Waiting requests are admitted from the front only, so nobody is overtaken; an
admitted request's prefill computes only the tokens the prefix cache does not hold. A prompt
is prefilled in one step (no chunked prefill), so ``max_num_batched_tokens`` must cover
``max_model_len``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.runtime.errors import InvalidPromptError, RequestTooLongError, UnknownRequestError
from engine.runtime.kv_cache import KVCacheConfigError, KVCacheManager
from engine.runtime.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits of one step."""

    max_num_seqs: int = 16  # rows in a decode batch
    max_num_batched_tokens: int = 2048  # prefill + decode tokens in one step
    max_model_len: int = 128  # prompt + output tokens of one request (the model's context)


@dataclass
class SchedulerOutput:
    """What one step runs. ``prefill`` rows compute all their tokens, ``decode`` rows one."""

    prefill: list[Request] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)  # memory freed this step
    finished_ids: list[str] = field(default_factory=list)  # finished or aborted since last step

    @property
    def requests(self) -> list[Request]:
        """Every scheduled request, prefill first; ``update`` takes tokens in this order."""
        return self.prefill + self.decode

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens the model computes this step (a prefill skips its cached prefix)."""
        return sum(r.num_tokens - r.num_computed_tokens for r in self.prefill) + len(self.decode)

    @property
    def is_empty(self) -> bool:
        """True when nothing runs this step."""
        return not self.prefill and not self.decode


class Scheduler:
    """Waiting queue + running list under ``max_num_seqs``, a token budget and KV memory."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        if config.max_num_batched_tokens < max(config.max_model_len, config.max_num_seqs):
            raise KVCacheConfigError(
                f"max_num_batched_tokens={config.max_num_batched_tokens} must be >= "
                f"max_model_len={config.max_model_len} and max_num_seqs={config.max_num_seqs}"
            )
        if kv.blocks_needed(config.max_model_len) > kv.num_blocks:
            raise KVCacheConfigError(
                f"the KV cache ({kv.num_blocks} blocks of {kv.block_size} tokens) cannot hold "
                f"one sequence of max_model_len={config.max_model_len} tokens"
            )
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request
        self._finished_ids: list[str] = []

    # -- requests in and out ------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request; raise :class:`RequestTooLongError` if its prompt cannot run."""
        n = request.num_prompt_tokens
        if n < 1:
            raise InvalidPromptError("the prompt is empty: it needs at least one token")
        if n >= self.config.max_model_len:
            raise RequestTooLongError(
                f"the prompt has {n} tokens; the model's context is {self.config.max_model_len}"
                " tokens, which must also hold at least one generated token"
            )
        if request.request_id in self.requests:
            raise InvalidPromptError(f"request id {request.request_id!r} is already in use")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish(
        self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> Request:
        """End a request now (abort, or a stop string found outside); its memory is freed."""
        request = self.requests.get(request_id)
        if request is None:
            raise UnknownRequestError(f"no unfinished request {request_id!r}")
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, status, stop_reason)
        return request

    def abort(self, request_id: str) -> Request | None:
        """Cancel a request if it is still unfinished; return it (None if unknown/finished)."""
        if request_id not in self.requests:
            return None
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED)

    def _finish(self, request: Request, status: RequestStatus, reason: int | str | None) -> None:
        request.status = status
        request.stop_reason = reason
        request.finished_time = time.monotonic()
        self.kv.free(request.request_id)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)  # its full blocks stay cached: the recompute is cheap
        self.kv.record_preemption()
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    # -- the step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests: decode the running ones, then admit waiting ones."""
        out = SchedulerOutput(finished_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            while not self.kv.allocate(request.request_id, request.num_computed_tokens + 1):
                victim = self.running.pop()  # the newest running request gives way
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                out.decode.append(request)
                budget -= 1
                i += 1
                continue
            break
        # Admitting right after a preemption would only evict again; wait for memory to free.
        while not out.preempted_ids and self.waiting:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            tokens = request.all_token_ids  # a resumed request recomputes its output too
            n = len(tokens)
            if n - self.kv.cached_tokens(tokens) > budget or not self.kv.can_admit(n):
                break
            cached = self.kv.admit(request.request_id, tokens, max_compute=budget)
            if cached is None:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = cached  # the prefill computes the rest
            self.running.append(request)
            out.prefill.append(request)
            budget -= n - cached
        return out

    def update(self, out: SchedulerOutput, sampled_token_ids: Sequence[int]) -> list[Request]:
        """Record each scheduled request's new token; finish those that stop. Returns them.

        Requests finished while the step ran (an abort) are skipped; their token is dropped.
        """
        now = time.monotonic()
        progressed = []
        caching, block = self.kv.enable_prefix_caching, self.kv.block_size
        for request, token in zip(out.requests, sampled_token_ids):
            if request.is_finished or request.status != RequestStatus.RUNNING:
                continue
            token = int(token)
            before, request.num_computed_tokens = request.num_computed_tokens, request.num_tokens
            if caching and before // block < request.num_tokens // block:
                # the blocks this step filled join the prefix cache
                self.kv.commit(request.request_id, request.all_token_ids, request.num_tokens)
            request.output_token_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = now
            status = self._stop_status(request, token)
            if status is not None:
                self.running.remove(request)
                stopped = status == RequestStatus.FINISHED_STOPPED
                self._finish(request, status, token if stopped else None)
            progressed.append(request)
        return progressed

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        """Why the request stops after ``token``, or None if it goes on."""
        params = request.params
        eos = token == request.eos_token_id and not params.ignore_eos
        if eos or token in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        full = request.num_tokens >= self.config.max_model_len
        if full or request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    # -- introspection --------------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        """True while any request waits or runs."""
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        """Requests in the waiting queue (new or preempted)."""
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        """Requests holding KV memory."""
        return len(self.running)
