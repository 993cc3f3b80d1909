"""Per-row sampling parameters and penalty counts that persist across decode steps.

Rows are written once when a request is (re)admitted and gathered by index every step, so a
step builds no per-request Python objects (vLLM v1's ``InputBatch`` does the same).
"""

from __future__ import annotations

import numpy as np

from engine.runtime.sampler import SamplerOutput, SamplingArrays, sample
from engine.runtime.sampling_params import SamplingParams


class SamplingState:
    """A fixed number of rows of sampling state; the model runner maps requests to rows."""

    def __init__(self, num_rows: int, vocab_size: int):
        self.vocab_size = vocab_size
        self.arrays = SamplingArrays.from_params([SamplingParams()] * num_rows, [0] * num_rows)
        # Allocated on the first request that uses a penalty: (rows, V) is the largest state here.
        self.output_counts: np.ndarray | None = None
        self.prompt_mask: np.ndarray | None = None
        # Rows that only need an argmax (greedy, no penalty, no logprobs): a batch made of
        # them skips the sampler entirely.
        self.argmax_only = np.zeros(num_rows, bool)

    def set_row(
        self,
        row: int,
        params: SamplingParams,
        seed: int,
        prompt_ids: list[int],
        output_ids: list[int],
    ) -> None:
        """Load one request's parameters (and its token counts, for penalties) into ``row``."""
        one = SamplingArrays.from_params([params], [seed])
        for name, column in self.arrays.__dict__.items():
            column[row] = getattr(one, name)[0]
        penalised = (
            params.repetition_penalty != 1.0
            or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0
        )
        self.argmax_only[row] = params.greedy and not penalised and params.logprobs is None
        if penalised and self.output_counts is None:
            rows = len(self.arrays.seed)
            self.output_counts = np.zeros((rows, self.vocab_size), np.int32)
            self.prompt_mask = np.zeros((rows, self.vocab_size), bool)
        if self.output_counts is not None:
            self.output_counts[row] = 0
            np.add.at(self.output_counts[row], np.asarray(output_ids, np.int64), 1)
            self.prompt_mask[row] = False
            self.prompt_mask[row, np.asarray(prompt_ids, np.int64)] = True

    def sample(self, logits: np.ndarray, rows: np.ndarray, steps: np.ndarray) -> SamplerOutput:
        """Sample one token for each of ``rows`` from ``logits`` (B, V) and count it."""
        if self.argmax_only[rows].all():
            return SamplerOutput(token_ids=logits.argmax(axis=1).astype(np.int64))
        params = self.arrays.take(rows)
        counts = mask = None
        if self.output_counts is not None:
            counts, mask = self.output_counts[rows], self.prompt_mask[rows]
        out = sample(logits, params, steps, counts, mask)
        if self.output_counts is not None:
            self.output_counts[rows, out.token_ids] += 1  # rows are distinct within a step
        return out
