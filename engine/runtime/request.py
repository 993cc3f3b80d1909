"""The state of one generation request as it moves through the scheduler."""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass, field

from engine.runtime.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is; the ``FINISHED_*`` states are final."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its KV memory freed; recomputed when readmitted
    FINISHED_STOPPED = "stop"  # end-of-text, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the model's context reached
    FINISHED_ABORTED = "abort"  # cancelled by the caller

    @property
    def finished(self) -> bool:
        """True for the final states."""
        return _is_final(self)


def _is_final(status: RequestStatus) -> bool:
    # Identity checks: hashing an Enum member runs Python code, and this runs per token.
    return (
        status is RequestStatus.FINISHED_STOPPED
        or status is RequestStatus.FINISHED_LENGTH
        or status is RequestStatus.FINISHED_ABORTED
    )


@dataclass
class Request:
    """One prompt being completed: its tokens, parameters, progress and timestamps.

    ``num_computed_tokens`` counts the tokens whose keys/values sit in the KV cache; the
    scheduler resets it to 0 on preemption (the request is recomputed from its tokens).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    seed: int = -1  # resolved at creation: the params' seed, else a fresh random one
    first_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        if self.seed < 0:
            self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(64)

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output: what a recompute after preemption must prefill."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the output so far."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finish_reason(self) -> str | None:
        """``"stop"``, ``"length"`` or ``"abort"`` once finished (OpenAI's names), else None."""
        return self.status.value if _is_final(self.status) else None

    @property
    def is_finished(self) -> bool:
        """True once the request reached a final state."""
        return _is_final(self.status)
