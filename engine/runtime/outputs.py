"""What the engine hands back per request and step, and the processor that makes it.

:class:`OutputProcessor` turns each step's sampled token ids into :class:`RequestOutput`s: it
keeps one incremental detokenizer per request, ends requests on stop strings and attaches
logprobs (vLLM v1's ``OutputProcessor`` does the same job). The scheduler never sees text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.runtime.detokenizer import CONTEXT_TOKENS, IncrementalDetokenizer
from engine.runtime.request import Request, RequestStatus
from engine.runtime.sampler import SamplerOutput


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
    """The log-probability of one sampled token and the top alternatives (token id, logprob).

    Logprobs are of the raw model distribution (before temperature and truncation).
    """

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


# Ends a request that matched a stop string: (request id, status, the stop string).
FinishFn = Callable[[str, RequestStatus, str], Any]


class OutputProcessor:
    """Detokenize each request's new tokens, cut at stop strings and build its outputs."""

    def __init__(self, tokenizer: Any, finish: FinishFn):
        self.tokenizer = tokenizer
        self._finish = finish
        self._detok: dict[str, IncrementalDetokenizer] = {}

    def add(self, request: Request) -> None:
        """Start the request's detokenizer (its stop strings, the end of its prompt)."""
        self._detok[request.request_id] = self._detokenizer(
            request.prompt_token_ids, request.params.stop
        )

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

    def step_outputs(
        self, requests: list[Request], token_ids: list[int], sampled: SamplerOutput
    ) -> list[RequestOutput]:
        """One output per live request of a step (``token_ids`` in ``requests`` order)."""
        outputs = []
        for row, (r, token) in enumerate(zip(requests, token_ids)):
            if r.status is RequestStatus.FINISHED_ABORTED:
                continue  # aborted while the step ran: its stream already ended
            detok = self._detok[r.request_id]
            delta = detok.add(token)
            outputs.append(self._output(r, token, delta, detok, sampled, row))
        return outputs

    def _output(
        self,
        r: Request,
        token: int,
        delta: str,
        detok: IncrementalDetokenizer,
        sampled: SamplerOutput,
        row: int,
    ) -> RequestOutput:
        if detok.stopped_on is not None:
            if r.is_finished:  # a stop string wins over a length limit reached by the same token
                r.status, r.stop_reason = RequestStatus.FINISHED_STOPPED, detok.stopped_on
            else:
                self._finish(r.request_id, RequestStatus.FINISHED_STOPPED, detok.stopped_on)
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

    def discard(self, request_id: str) -> None:
        """Forget a request that ends without a last output."""
        self._detok.pop(request_id, None)

    def finished_output(self, r: Request) -> RequestOutput:
        """The last output of a request ended from outside (an abort): no new tokens."""
        detok = self._detok.pop(r.request_id, None)
        text = detok.output_text if detok else ""
        usage = Usage(r.num_prompt_tokens, r.num_output_tokens)
        tokens, reason = list(r.output_token_ids), r.finish_reason
        return RequestOutput(r.request_id, "", [], text, tokens, True, reason, None, usage)
