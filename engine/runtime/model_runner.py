"""The model runner: owns the KV buffers and runs prefill/decode through a ``kv_inplace`` graph.

Memory: per key/value tensor one flat buffer of ``slots * H * max_model_len * D`` floats,
allocated once. A request holds one slot (its KV-cache block id: the manager runs with
``block_size = max_model_len``). The buffer is viewed as (slots, H, W, D) for a window ``W``
that covers the longest live sequence, rounded up to ``window_step`` tokens, so a decode step
attends over W slots rather than max_model_len. When the longest sequence crosses a window
boundary the slots are re-laid out inside the same buffer (a few times per sequence, one copy
of the live cache each time, no allocation).

A decode step feeds the contiguous slot range ``[lo, hi)`` of that view straight to the graph
(never a copy), gets back only the new token's keys/values, and writes them in place with one
fancy-indexed assignment per tensor. Idle slots inside the range ride along masked out and
their outputs are ignored; the manager hands out low slot ids first, so the range stays tight.
The cache mask is not stored: slot t of a sequence is valid iff t < its length.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.runtime.backends import Backend
from engine.runtime.errors import ModelSignatureError
from engine.runtime.sampler import SamplerOutput
from engine.runtime.sampling_state import SamplingState
from engine.runtime.scheduler import SchedulerOutput

_TOKEN_INPUTS = ("input_ids", "position_ids", "cache_mask", "new_mask")


@dataclass(frozen=True)
class InplaceGraph:
    """The roles of a ``kv_inplace`` graph's tensors (the convention of exporters/greedy.py)."""

    logits: str
    kv: tuple[tuple[str, str], ...]  # (cache input, new output) per key/value tensor
    num_heads: int
    head_dim: int
    dtype: str

    @classmethod
    def from_manifest(cls, graph: dict[str, Any]) -> InplaceGraph:
        """Read the roles from a manifest's graph entry (its ``inputs``/``outputs`` lists)."""
        inputs = {t["name"]: t for t in graph["inputs"]}
        outputs = [t["name"] for t in graph["outputs"]]
        missing = [n for n in _TOKEN_INPUTS if n not in inputs]
        if missing:
            raise ModelSignatureError(f"the kv_inplace graph lacks inputs {missing}")
        kv = []
        for name, spec in inputs.items():
            if name in _TOKEN_INPUTS:
                continue
            new = "new." + name.split(".", 1)[-1]
            if len(spec["shape"]) != 4 or new not in outputs:
                raise ModelSignatureError(f"cannot pair kv_inplace input {name!r} with an output")
            kv.append((name, new))
        if not kv:
            raise ModelSignatureError("the kv_inplace graph has no cache inputs")
        _, heads, _, dim = inputs[kv[0][0]]["shape"]
        if not (isinstance(heads, int) and isinstance(dim, int)):
            raise ModelSignatureError("cache inputs need fixed head and head-dim axes")
        logits = next(n for n in outputs if not n.startswith("new."))
        return cls(logits, tuple(kv), heads, dim, inputs[kv[0][0]]["dtype"])


def pack_prompts(
    requests: list, slots: np.ndarray, pad_token_id: int, sampling: SamplingState
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token ids (n, S) and lengths (n,) of requests being (re)admitted.

    Also loads each request's sampling parameters into its slot's row: admission work, done
    once per request, shared by every runner.
    """
    lens = np.array([r.num_tokens for r in requests], np.int64)
    ids = np.full((len(requests), int(lens.max())), pad_token_id, np.int64)
    for row, r in enumerate(requests):
        tokens = r.all_token_ids
        ids[row, : len(tokens)] = tokens
        sampling.set_row(int(slots[row]), r.params, r.seed, r.prompt_token_ids, r.output_token_ids)
    return ids, lens


class SlotRunner(ABC):
    """What every runner shares: per-slot decode state and the step that samples from it.

    A runner computes logits for the prefill part (:meth:`_prefill`) and the decode part
    (:meth:`_decode`) of a step; this class samples from them and advances each slot.
    """

    def _init_slots(self, num_slots: int, vocab_size: int, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id
        self.length = np.zeros(num_slots, np.int64)  # cached tokens = next write position
        self.last_token = np.full(num_slots, pad_token_id, np.int64)
        self.steps = np.zeros(num_slots, np.int64)  # output tokens so far (keys the RNG)
        self.sampling = SamplingState(num_slots, vocab_size)

    def release(self, slots: np.ndarray) -> None:
        """Forget finished or preempted slots (their data is dead; windows may shrink)."""
        self.length[slots] = 0

    def execute(self, out: SchedulerOutput, slots: np.ndarray) -> SamplerOutput:
        """Run one step; ``slots`` (len(out.requests),) gives each scheduled request's slot.

        Returns the sampled tokens in ``out.requests`` order (prefill first, then decode).
        """
        n = len(out.prefill)
        parts = []
        if n:
            parts.append(self._prefill(out, slots[:n]))
        if len(out.decode):
            parts.append(self._decode(slots[n:]))
        sampled = self._sample(parts, slots)
        self.last_token[slots] = sampled.token_ids
        self.steps[slots] += 1
        return sampled

    def _sample(self, parts: list, slots: np.ndarray) -> SamplerOutput:
        """Sample from the step's logits (numpy (n, V) parts, in ``slots`` order)."""
        logits = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self.sampling.sample(logits, slots, self.steps[slots])

    @abstractmethod
    def _prefill(self, out: SchedulerOutput, slots: np.ndarray) -> Any:
        """Compute whole prompts into fresh slots; return their last-token logits."""

    @abstractmethod
    def _decode(self, slots: np.ndarray) -> Any:
        """One token for each slot; return the logits."""


class ModelRunner(SlotRunner):
    """Runs scheduled requests through the graph and samples their next tokens."""

    def __init__(
        self,
        backend: Backend,
        graph: InplaceGraph,
        num_slots: int,
        max_model_len: int,
        vocab_size: int,
        pad_token_id: int = 0,
        io_binding: bool = True,
        window_step: int = 16,
    ):
        self.backend, self.graph = backend, graph
        self.num_slots, self.max_model_len = num_slots, max_model_len
        self.io_binding = io_binding
        self.window_step = window_step
        H, T, D = graph.num_heads, max_model_len, graph.head_dim
        self._block = H * D  # floats per slot per cached token
        dtype = np.dtype(graph.dtype)
        K = len(graph.kv)
        # The KV pool: one allocation for every key/value tensor (row j is graph.kv[j]), written
        # in place, never reallocated. One array lets a step write all new K/V in one call.
        self._pool = np.zeros((K, num_slots * H * T * D), dtype)
        self.window = min(window_step, T)
        self._view = self.cache()
        self._mask = np.zeros(num_slots * T, np.int64)
        self._arange = np.arange(T, dtype=np.int64)
        # Per-slot decode state, updated with vectorized writes after every step.
        self._init_slots(num_slots, vocab_size, pad_token_id)
        self._ids = np.full((num_slots, 1), pad_token_id, np.int64)
        self._pos = np.zeros((num_slots, 1), np.int64)
        self._ones = np.ones((num_slots, 1), np.int64)
        # Decode outputs, bound (IOBinding) to these preallocated arrays.
        self._logits = np.zeros((num_slots, 1, vocab_size), np.float32)
        self._new = np.zeros((K, num_slots, H, 1, D), dtype)
        # An empty one-slot cache for prefill: a fresh request attends only to its own tokens.
        self._no_cache = np.zeros((num_slots, H, 1, D), dtype)
        self._no_mask = np.zeros((num_slots, 1), np.int64)
        self._bound: tuple | None = None  # (key, feeds, outputs) of the last bound decode step

    @property
    def kv_bytes(self) -> int:
        """Bytes of the preallocated KV pool."""
        return self._pool.nbytes

    def cache(self, window: int | None = None) -> np.ndarray:
        """The (K, slots, H, window, D) view of the pool (default: the current window)."""
        w = self.window if window is None else window
        H, D = self.graph.num_heads, self.graph.head_dim
        return self._pool[:, : self.num_slots * self._block * w].reshape(
            len(self.graph.kv), self.num_slots, H, w, D
        )

    def _fit_window(self, needed: int) -> None:
        """Re-lay the pool out for the smallest window step that holds ``needed`` tokens.

        Growing is a must. Shrinking copies every live sequence to save attention over one
        step of idle slots, which the next growth takes back: when the longest of many
        sequences ends, the others soon reach the old window again. So the window shrinks
        only when that saves at least two steps, or when nothing live would be copied.
        """
        step = self.window_step
        window = min(self.max_model_len, max(step, -(-needed // step) * step))
        if window == self.window:
            return
        if self.window - 2 * step < window < self.window and self.length.any():
            return  # a shrink by one step: not worth a copy of the live cache
        old, keep = self.window, min(self.window, window)
        live = np.flatnonzero(self.length)
        # Growing moves each slot to a higher offset, so go last-first; shrinking, first-last.
        # A slot only ever overlaps its own old place, which numpy's assignment handles.
        order = live[::-1] if window > old else live
        src, dst = self.cache(old), self.cache(window)
        for s in order:
            dst[:, s, :, :keep] = src[:, s, :, :keep]
        self.window = window
        self._view = dst
        self._bound = None

    def _prefill(self, out: SchedulerOutput, slots: np.ndarray) -> np.ndarray:
        """Compute whole prompts (right-padded) into fresh slots; return last-token logits."""
        requests = out.prefill
        ids, lens = pack_prompts(requests, slots, self.pad_token_id, self.sampling)
        n, S = ids.shape
        new_mask = (self._arange[:S][None, :] < lens[:, None]).astype(np.int64)
        feeds = {
            "input_ids": ids,
            "position_ids": np.broadcast_to(self._arange[:S], (n, S)).copy(),
            "cache_mask": self._no_mask[:n],
            "new_mask": new_mask,
            **{name: self._no_cache[:n] for name, _ in self.graph.kv},
        }
        result = self.backend.run(feeds)
        self.length[slots] = 0
        self._fit_window(max(S, int(self.length.max())))
        for j, (_, new) in enumerate(self.graph.kv):
            self._view[j, slots, :, :S, :] = result[new]  # slots past a row's length: masked
        self.length[slots] = lens
        self.steps[slots] = [r.num_output_tokens for r in requests]
        return result[self.graph.logits][np.arange(n), lens - 1]

    def _feeds(self, lo: int, hi: int, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Decode inputs for the slot range [lo, hi): views of the runner's buffers, no copies."""
        feeds = {
            "input_ids": self._ids[lo:hi],
            "position_ids": self._pos[lo:hi],
            "cache_mask": mask,
            "new_mask": self._ones[lo:hi],
        }
        feeds.update((name, self._view[j, lo:hi]) for j, (name, _) in enumerate(self.graph.kv))
        return feeds

    def _outputs(self, n: int) -> dict[str, np.ndarray]:
        """Decode outputs for ``n`` rows: views of the preallocated logits and new-K/V arrays."""
        outs = {self.graph.logits: self._logits[:n]}
        outs.update((new, self._new[j, :n]) for j, (_, new) in enumerate(self.graph.kv))
        return outs

    def _decode(self, slots: np.ndarray) -> np.ndarray:
        """One token for each slot, reading the KV pool in place; return their logits (d, V)."""
        self._fit_window(int(self.length.max()) + 1)
        lo, hi = int(slots.min()), int(slots.max()) + 1
        n, W = hi - lo, self.window  # n rows in the range, W cache slots each
        self._ids[slots, 0] = self.last_token[slots]
        self._pos[slots, 0] = self.length[slots]
        mask = self._mask[: n * W].reshape(n, W)
        np.less(self._arange[:W], self.length[lo:hi, None], out=mask, casting="unsafe")
        view = self._view
        if self.io_binding:
            # Every array bound here is a fixed view of a preallocated buffer: while the range
            # and the window stay the same, the previous step's binding still points at them.
            key = (lo, hi, W)
            if self._bound is None or self._bound[0] != key:
                self._bound = (key, self._feeds(lo, hi, mask), self._outputs(n))
            _, feeds, outs = self._bound
            result = self.backend.run(feeds, outs, binding_key=key)
            new = self._new[:, :n]
        else:
            result = self.backend.run(self._feeds(lo, hi, mask))
            new = np.stack([result[name] for _, name in self.graph.kv])
        pos = self.length[slots]
        # Usually every row in [lo, hi) is scheduled, in order: then the outputs need no gather.
        if len(slots) == n and (n == 1 or (np.diff(slots) == 1).all()):
            # view[:, slots, :, pos, :] is (n, K, H, D): the advanced indices go first
            view[:, slots, :, pos, :] = new[:, :, :, 0, :].transpose(1, 0, 2, 3)
            logits = result[self.graph.logits][:, 0]
        else:
            rows = slots - lo
            view[:, slots, :, pos, :] = new[:, rows, :, 0, :]  # (n, K, H, D) as well
            logits = result[self.graph.logits][rows, 0]
        self.length[slots] += 1
        return logits
