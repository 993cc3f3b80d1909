"""What the engine hands back per request and step, and the processor that makes it.

:class:`OutputProcessor` turns each step's sampled token ids into :class:`RequestOutput`s: it
keeps one incremental detokenizer per request, ends requests on stop strings and attaches
logprobs (vLLM v1's ``OutputProcessor`` does the same job). The scheduler never sees text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

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


class RequestOutput:
    """What one step produced for one request: a text delta and the tokens behind it.

    ``text``, ``token_ids`` and ``usage`` describe the whole output so far. They are read from
    the request's append-only token list and text up to this output's length, so making an
    output copies nothing that grows with the request (a server reads only the deltas).
    """

    __slots__ = (
        "request_id",
        "delta_text",
        "delta_token_ids",
        "finished",
        "finish_reason",
        "stop_reason",
        "logprobs",
        "_ids",
        "_num_ids",
        "_text",
        "_text_len",
        "_prompt_tokens",
    )

    def __init__(
        self,
        request_id: str,
        delta_text: str,
        delta_token_ids: list[int],
        text: str | TextSource,  # all text so far (stop string excluded), or where to read it
        token_ids: list[int],  # all output tokens so far, or a list they are a prefix of
        finished: bool,
        finish_reason: str | None,  # "stop", "length", "abort"
        stop_reason: int | str | None,  # the stop token id or stop string, when one matched
        prompt_tokens: int,
        logprobs: list[TokenLogprob] | None = None,
        num_tokens: int | None = None,  # how many of token_ids (default: all)
        text_len: int | None = None,  # how much of the text source's text (default: all)
    ):
        self.request_id = request_id
        self.delta_text = delta_text
        self.delta_token_ids = delta_token_ids
        self.finished = finished
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason
        self.logprobs = logprobs
        self._ids = token_ids
        self._num_ids = len(token_ids) if num_tokens is None else num_tokens
        self._text = text
        self._text_len = text_len
        self._prompt_tokens = prompt_tokens

    @property
    def token_ids(self) -> list[int]:
        """All output tokens so far."""
        return self._ids[: self._num_ids]

    @property
    def text(self) -> str:
        """All output text so far (a matched stop string excluded)."""
        text = self._text if isinstance(self._text, str) else self._text.text
        return text if self._text_len is None else text[: self._text_len]

    @property
    def usage(self) -> Usage:
        """Prompt and output token counts."""
        return Usage(self._prompt_tokens, self._num_ids)

    def merged(self, later: RequestOutput) -> RequestOutput:
        """This output followed by ``later`` (of the same request) as one output."""
        logprobs = self.logprobs
        if later.logprobs is not None:
            logprobs = (logprobs or []) + later.logprobs
        return RequestOutput(
            self.request_id,
            self.delta_text + later.delta_text,
            self.delta_token_ids + later.delta_token_ids,
            later._text,
            later._ids,
            later.finished,
            later.finish_reason,
            later.stop_reason,
            later._prompt_tokens,
            logprobs,
            later._num_ids,
            later._text_len,
        )

    def __repr__(self) -> str:
        return (
            f"RequestOutput({self.request_id!r}, delta_text={self.delta_text!r}, "
            f"delta_token_ids={self.delta_token_ids}, finished={self.finished}, "
            f"finish_reason={self.finish_reason!r}, usage={self.usage})"
        )


class TextSource(Protocol):
    """Something whose ``text`` only ever grows (an incremental detokenizer)."""

    text: str


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
        finished = r.is_finished
        return RequestOutput(
            r.request_id,
            delta,
            [token],
            detok,
            r.output_token_ids,
            finished,
            r.finish_reason if finished else None,
            r.stop_reason,
            r.num_prompt_tokens,
            logprobs,
            len(r.output_token_ids),
            detok.emitted,
        )

    def discard(self, request_id: str) -> None:
        """Forget a request that ends without a last output."""
        self._detok.pop(request_id, None)

    def finished_output(self, r: Request) -> RequestOutput:
        """The last output of a request ended from outside (an abort): no new tokens."""
        detok = self._detok.pop(r.request_id, None)
        text = detok.output_text if detok else ""
        tokens, reason = list(r.output_token_ids), r.finish_reason
        prompt = r.num_prompt_tokens
        return RequestOutput(r.request_id, "", [], text, tokens, True, reason, None, prompt)
