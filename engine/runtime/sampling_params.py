"""Per-request sampling parameters, with validation that names the offending field."""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine import sampling_defaults as defaults
from engine.runtime.errors import InvalidSamplingParamsError

MAX_LOGPROBS = 20  # OpenAI's limit; top-n logprobs cost a partition over the vocabulary
MAX_SEED = 2**64 - 1  # seeds key a 64-bit counter-based stream


@dataclass
class SamplingParams:
    """How one request is sampled and when it stops.

    Order of application (as in vLLM): repetition, presence and frequency penalties on the raw
    logits, then temperature, then ``min_p``, ``top_k`` and ``top_p`` on the result.
    """

    # Defaults: engine/sampling_defaults.py, the same on every path.
    temperature: float = defaults.TEMPERATURE  # 0 means greedy (argmax of penalised logits)
    top_k: int = defaults.TOP_K  # 0 (or -1, as in vLLM) keeps the whole vocabulary
    top_p: float = defaults.TOP_P  # nucleus: smallest set of top tokens whose mass reaches it
    min_p: float = 0.0  # drop tokens whose probability is below min_p * the top probability
    repetition_penalty: float = 1.0  # HF/vLLM: >1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0  # OpenAI: subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the output
    max_tokens: int = defaults.MAX_TOKENS
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # the matched stop string is not included in the output
    seed: int | None = None  # None: a random seed is drawn when the request is admitted
    logprobs: int | None = None  # n top logprobs per token (0 = only the sampled token's)
    ignore_eos: bool = False  # keep generating past the end-of-text token (benchmarks)

    def __post_init__(self) -> None:
        # Accept lists and a single string from callers; store immutable tuples.
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax every step."""
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise :class:`InvalidSamplingParamsError` for an out-of-range value; return self."""

        def bad(name: str, rule: str) -> InvalidSamplingParamsError:
            value = getattr(self, name)
            return InvalidSamplingParamsError(f"{name} must be {rule}, got {value!r}")

        def finite(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(name, "a number")
            if not math.isfinite(value):
                raise bad(name, "finite")
            return float(value)

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, "an integer")
            return value

        if finite("temperature") < 0:
            raise bad("temperature", ">= 0 (0 means greedy)")
        if integer("top_k") < 0:
            raise bad("top_k", ">= 0 (0 or -1 disables it)")
        if not 0.0 < finite("top_p") <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not 0.0 <= finite("min_p") <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if finite("repetition_penalty") <= 0:
            raise bad("repetition_penalty", "> 0 (1 disables it)")
        if not -2.0 <= finite("presence_penalty") <= 2.0:
            raise bad("presence_penalty", "in [-2, 2]")
        if not -2.0 <= finite("frequency_penalty") <= 2.0:
            raise bad("frequency_penalty", "in [-2, 2]")
        if integer("max_tokens") < 1:
            raise bad("max_tokens", ">= 1")
        if self.seed is not None and not 0 <= integer("seed") <= MAX_SEED:
            raise bad("seed", f"in [0, {MAX_SEED}]")
        if self.logprobs is not None and not 0 <= integer("logprobs") <= MAX_LOGPROBS:
            raise bad("logprobs", f"in [0, {MAX_LOGPROBS}]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        if vocab_size is not None:
            if self.top_k > vocab_size:
                raise bad("top_k", f"<= the vocabulary size {vocab_size}")
            if any(not 0 <= t < vocab_size for t in self.stop_token_ids):
                raise bad("stop_token_ids", f"token ids in [0, {vocab_size})")
        return self
