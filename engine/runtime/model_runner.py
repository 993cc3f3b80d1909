"""The model runner: owns the KV pool and runs prefill/decode through a paged ``kv_inplace`` graph.

Memory: a pool of blocks of ``block_size`` tokens per key/value tensor (engine/runtime/
kv_pool.py), sized from the KV budget and allocated once. A request holds the blocks the
KV-cache manager gave it, one per ``block_size`` tokens it has; the runner keeps each slot's
block table (slots are per-request rows of decode state, at most ``max_num_seqs``).

A decode step feeds blocks ``[0, P)`` of the pool straight to the graph (never a copy; the
manager keeps blocks in use packed at low ids, so little else lies below P), with each row's
block table and mask and, per pool block, the row that owns it and its place in that row's
table (engine/paged_inputs.py: computed here in numpy, into the step's bound arrays). The
graph computes each block's scores against its owner's queries where the block lies, so
attention reads only live blocks and never gathers the cache (measured: a gather of the live
blocks into a dense (B, H, T, D) cache made a batch-16 decode step 1.2-1.5x slower; see the
README). The graph returns only the new token's keys/values, which the runner writes into the
pool with one indexed assignment. A prefill gathers just the blocks its prompts found in the
prefix cache into a small pool of its own (prefills are rare and their blocks few).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.paged_inputs import block_mask, block_roles, causal_mask
from engine.runtime.backends import Backend
from engine.runtime.errors import ModelSignatureError
from engine.runtime.kv_pool import DeviceKVPool, HostKVPool
from engine.runtime.sampler import SamplerOutput
from engine.runtime.sampling_state import SamplingState
from engine.runtime.scheduler import SchedulerOutput
from engine.serving_contract import KV_INPUTS, outdated_kv_graph

_TOKEN_INPUTS = KV_INPUTS  # the paged graph's inputs besides the cache pools
# A decode step binds the pool up to a multiple of min(this, rows) blocks: with many rows a
# block is allocated almost every step, and rounding up keeps the binding for several steps;
# one row's new block changes its table width anyway, so there the pool is bound exactly
# (every block past the last used one would be scored, then discarded).
BINDING_BLOCKS = 8


@dataclass(frozen=True)
class InplaceGraph:
    """The roles of a paged ``kv_inplace`` graph's tensors (engine/graph_decoder.py)."""

    logits: str
    kv: tuple[tuple[str, str], ...]  # (pool input, new output) per key/value tensor
    num_heads: int
    block_size: int
    head_dim: int
    dtype: str

    @classmethod
    def from_manifest(cls, graph: dict[str, Any]) -> InplaceGraph:
        """Read the roles from a manifest's graph entry (its ``inputs``/``outputs`` lists)."""
        inputs = {t["name"]: t for t in graph["inputs"]}
        outputs = [t["name"] for t in graph["outputs"]]
        outdated = outdated_kv_graph(inputs)
        if outdated:
            raise ModelSignatureError(f"this version: {outdated} to serve it with this runtime")
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
        _, heads, block, dim = inputs[kv[0][0]]["shape"]
        if not all(isinstance(d, int) for d in (heads, block, dim)):
            raise ModelSignatureError("KV pools need fixed head, block and head-dim axes")
        logits = next(n for n in outputs if not n.startswith("new."))
        return cls(logits, tuple(kv), heads, block, dim, inputs[kv[0][0]]["dtype"])


def pack_prompts(
    requests: list,
    slots: np.ndarray,
    pad_token_id: int,
    sampling: SamplingState,
    skip: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids (n, S) of the tokens requests being (re)admitted must compute, and
    how many each has (n,); ``skip`` (n,) leading tokens of each are cached already.

    Also loads each request's sampling parameters into its slot's row: admission work, done
    once per request, shared by every runner.
    """
    skip = np.zeros(len(requests), np.int64) if skip is None else skip
    lens = np.array([r.num_tokens for r in requests], np.int64) - skip
    ids = np.full((len(requests), int(lens.max())), pad_token_id, np.int64)
    for row, r in enumerate(requests):
        tokens = r.all_token_ids[int(skip[row]) :]
        ids[row, : len(tokens)] = tokens
        sampling.set_row(int(slots[row]), r.params, r.seed, r.prompt_token_ids, r.output_token_ids)
    return ids, lens


# What one more prefill graph call costs, in padded token positions it would save: the
# fixed cost of a call (feeds, dispatch of every node) is that of a few dozen tokens' compute.
GROUP_CALL_TOKENS = 64


def length_groups(lens: np.ndarray, call_tokens: int = GROUP_CALL_TOKENS) -> list[np.ndarray]:
    """Split prefill rows into groups of similar length (each group one graph call).

    Rows are taken shortest first; a row starts a new group when lifting the current group
    to its length would pad more positions than ``call_tokens`` (what a separate call costs).
    One group when the lengths are close; a long prompt among short ones runs alone.
    """
    order = np.argsort(lens, kind="stable")
    groups, start, width = [], 0, int(lens[order[0]])
    for i in range(1, len(order)):
        length = int(lens[order[i]])
        if (i - start) * (length - width) > call_tokens:
            groups.append(order[start:i])
            start = i
        width = length
    groups.append(order[start:])
    return groups


class SlotRunner(ABC):
    """What every runner shares: per-slot decode state and the step that samples from it.

    A runner computes logits for the prefill part (:meth:`_prefill`) and the decode part
    (:meth:`_decode`) of a step; this class samples from them and advances each slot.
    """

    supports_prefix_caching = False  # True: prefills start after cached tokens, and
    # assign_blocks / copy_blocks place them (the KV-cache manager's block ids)

    def assign_blocks(self, slot: int, blocks: list[int]) -> None:  # noqa: B027 - optional
        """The request in ``slot`` now holds ``blocks`` (in token order)."""

    def copy_blocks(self, copies: list) -> None:  # noqa: B027 - optional
        """Apply the KV-cache manager's block copies, in order, before the step computes."""

    def _init_slots(self, num_slots: int, vocab_size: int, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id
        self.length = np.zeros(num_slots, np.int64)  # tokens in the cache = next position
        self.last_token = np.full(num_slots, pad_token_id, np.int64)
        self.steps = np.zeros(num_slots, np.int64)  # output tokens so far (keys the RNG)
        self.sampling = SamplingState(num_slots, vocab_size)

    def release(self, slots: np.ndarray) -> None:
        """Forget finished or preempted slots (their blocks now belong to the manager)."""
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
    """Runs scheduled requests through the paged graph and samples their next tokens."""

    supports_prefix_caching = True

    def __init__(
        self,
        backend: Backend,
        graph: InplaceGraph,
        num_slots: int,
        num_blocks: int,
        max_model_len: int,
        vocab_size: int,
        pad_token_id: int = 0,
        io_binding: bool = True,
    ):
        self.backend, self.graph = backend, graph
        self.num_slots, self.num_blocks = num_slots, num_blocks
        self.max_model_len = max_model_len
        # A backend on a GPU: the pool, the new keys/values and the empty prefill pool live in
        # device memory, bound by pointer (so always through an IOBinding).
        self.device = getattr(backend, "device", None)
        self.io_binding = io_binding or self.device is not None
        H, D, bs = graph.num_heads, graph.head_dim, graph.block_size
        self.block_size = bs
        K = len(graph.kv)
        if self.device is None:
            self.pool = HostKVPool(K, num_blocks, H, bs, D, graph.dtype)
        else:
            self.pool = DeviceKVPool(self.device, K, num_blocks, H, bs, D, graph.dtype)
        width = -(-max_model_len // bs)  # blocks of the longest sequence
        # Block tables: row s lists slot s's blocks; per block, the slot holding it (-1: none)
        # and its place in that slot's table. Written when the manager hands blocks out.
        self.table = np.zeros((num_slots, width), np.int64)
        self.num_held = np.zeros(num_slots, np.int64)
        self.block_slot = np.full(num_blocks, -1, np.int64)
        self.block_pos = np.zeros(num_blocks, np.int64)
        self._init_slots(num_slots, vocab_size, pad_token_id)
        # Decode scratch; the step's inputs are arrays made per shape (:meth:`_feeds`) and
        # filled in place, so an IOBinding stays valid while the shapes (rows, table width,
        # pool blocks) do, and the outputs views of preallocated ones.
        self._table = np.zeros(num_slots * width, np.int64)
        self._owner = np.zeros(num_blocks, np.int64)
        self._index = np.zeros(num_blocks, np.int64)
        self._row_of_slot = np.full(num_slots + 1, -1, np.int64)  # [-1] answers block_slot -1
        self._logits = np.zeros((num_slots, 1, vocab_size), np.float32)
        zeros = np.zeros if self.device is None else self.device.zeros
        self._new = zeros((K, num_slots, H, 1, D), np.dtype(graph.dtype))
        self._no_pool = zeros((1, H, bs, D), np.dtype(graph.dtype))
        self._bound: tuple | None = None  # (key, feeds, outputs) of the last decode shape
        # Block tables change only when blocks are handed out or taken back (this counts the
        # calls) or a row's cache enters a new block; between, a step's block inputs are the
        # last step's with one more token unmasked per row. (slots, cache blocks, generation)
        # of the last decode step:
        self._generation = 0
        self._last_decode: tuple | None = None

    @property
    def kv_bytes(self) -> int:
        """Bytes of the preallocated KV pool."""
        return self.pool.nbytes

    # -- blocks ---------------------------------------------------------------------------------
    def assign_blocks(self, slot: int, blocks: list[int]) -> None:
        """The request in ``slot`` now holds ``blocks`` (in token order)."""
        self._generation += 1
        n = len(blocks)
        ids = np.asarray(blocks, np.int64)
        self.table[slot, :n] = ids
        self.num_held[slot] = n
        self.block_slot[ids] = slot
        self.block_pos[ids] = np.arange(n)

    def copy_blocks(self, copies: list) -> None:
        """Apply the manager's block copies (prefix hits, cached blocks moved) in order."""
        self._generation += 1
        self.pool.copy(copies)

    def release(self, slots: np.ndarray) -> None:
        """Forget finished or preempted slots; their blocks go back to the manager."""
        self._generation += 1
        for slot in slots.tolist():
            held = self.table[slot, : self.num_held[slot]]
            mine = held[self.block_slot[held] == slot]  # not yet handed to someone else
            self.block_slot[mine] = -1
        self.num_held[slots] = 0
        super().release(slots)

    # -- prefill --------------------------------------------------------------------------------
    def _prefill(self, out: SchedulerOutput, slots: np.ndarray) -> np.ndarray:
        """Compute each prompt's uncached tokens (right-padded); return last-token logits.

        Prompts of very different lengths run as separate graph calls (:func:`length_groups`):
        one batch pads every row to the longest, and the graph computes every padded
        position through every layer and the vocabulary head.
        """
        requests = out.prefill
        cached = np.array([r.num_computed_tokens for r in requests], np.int64)
        ids, lens = pack_prompts(requests, slots, self.pad_token_id, self.sampling, cached)
        logits = np.empty((len(requests), self._logits.shape[-1]), np.float32)
        for rows in length_groups(lens):
            S = int(lens[rows].max())
            logits[rows] = self._prefill_rows(ids[rows, :S], lens[rows], cached[rows], slots[rows])
        self.length[slots] = cached + lens
        self.steps[slots] = [r.num_output_tokens for r in requests]
        return logits

    def _prefill_rows(
        self, ids: np.ndarray, lens: np.ndarray, cached: np.ndarray, slots: np.ndarray
    ) -> np.ndarray:
        """One prefill graph call over right-padded ``ids``; write the new keys/values into
        the pool and return each row's last-token logits."""
        n, S = ids.shape
        bs = self.block_size
        arange = np.arange(S, dtype=np.int64)
        new_mask = arange[None, :] < lens[:, None]
        positions = np.where(new_mask, cached[:, None] + arange[None, :], 0)  # pads: 0
        feeds = {
            "input_ids": ids,
            "position_ids": positions,
            "causal_mask": causal_mask(new_mask),
            **self._prefill_cache(slots, cached),
        }
        # the new tokens' keys/values, real ones only, after each row's cached tokens
        rows, cols = np.nonzero(new_mask)
        if self.device is None:
            result = self.backend.run(feeds)
            new = np.stack([result[name] for _, name in self.graph.kv])  # (K, n, H, S, D)
            picked = new[:, rows, :, cols, :]
        else:  # the graph writes its new keys/values into device memory; they stay there
            new = self.device.zeros(
                (len(self.graph.kv), n, self.graph.num_heads, S, self.graph.head_dim),
                np.dtype(self.graph.dtype),
            )
            outs = {name: new[j] for j, (_, name) in enumerate(self.graph.kv)}
            outs[self.graph.logits] = np.empty((n, S, self._logits.shape[-1]), np.float32)
            self.device.synchronize()  # the previous step's scatter is in the pool
            result = self.backend.run(feeds, outs)
            picked = new[:, self.pool.index(rows), :, self.pool.index(cols), :]
        pos = cached[rows] + cols
        blocks = self.table[slots[rows], pos // bs]
        self.pool.write(blocks, pos % bs, picked)
        return result[self.graph.logits][np.arange(n), lens - 1]

    def _prefill_cache(self, slots: np.ndarray, cached: np.ndarray) -> dict:
        """A small pool of just the prompts' cached blocks (a copy), and its block tables.

        ``cached`` (n,) counts each row's cached tokens: whole blocks (prefix-cache hits).
        """
        n, bs = len(slots), self.block_size
        cached_blocks = cached // bs
        nb = max(1, int(cached_blocks.max()))
        if not cached_blocks.any():  # nothing cached: one empty block nobody reads
            pools = {name: self._no_pool for name, _ in self.graph.kv}
            owner, index = np.full(1, -1, np.int64), np.zeros(1, np.int64)
            table = np.zeros((n, 1), np.int64)
        else:
            owner = np.repeat(np.arange(n), cached_blocks)
            index = np.concatenate([np.arange(c) for c in cached_blocks])
            table = np.zeros((n, nb), np.int64)
            table[owner, index] = np.arange(len(owner))
            gathered = self.pool.gather(self.table[slots[owner], index])  # (K, m, H, bs, D)
            pools = {name: gathered[j] for j, (name, _) in enumerate(self.graph.kv)}
        rows, block_slots, weights = block_roles(owner, index, n, nb, self.graph.dtype)
        return {
            "block_table": table,
            "block_mask": block_mask(cached, nb, bs),
            "block_rows": rows,
            "block_slots": block_slots,
            "block_weights": weights,
            **pools,
        }

    # -- decode ---------------------------------------------------------------------------------
    def _decode(self, slots: np.ndarray) -> np.ndarray:
        """One token for each slot, reading the pool in place; return their logits (n, V)."""
        n, bs = len(slots), self.block_size
        length = self.length[slots]
        cache_blocks = -(-length // bs)  # blocks holding each row's cached tokens
        last = self._last_decode
        if (
            last is not None
            and last[2] == self._generation
            and np.array_equal(last[0], slots)
            and np.array_equal(last[1], cache_blocks)
        ):  # the same rows and blocks as the last step: only last step's token is new
            key, feeds, outs = self._bound
            feeds["block_mask"].reshape(n, -1)[np.arange(n), length - 1] = True
        else:
            key, feeds, outs = self._block_inputs(slots, length, cache_blocks)
            self._last_decode = (slots.copy(), cache_blocks, self._generation)
        feeds["input_ids"][:, 0] = self.last_token[slots]
        feeds["position_ids"][:, 0] = length
        if self.io_binding:
            if self.device is not None:
                self.device.synchronize()  # the previous step's scatter is in the pool
            result = self.backend.run(feeds, outs, binding_key=key)
            new = self._new[:, :n]
        else:
            result = self.backend.run(feeds)
            new = np.stack([result[name] for _, name in self.graph.kv])
        blocks = self.table[slots, length // bs]
        self.pool.write(blocks, length % bs, new[:, :, :, 0, :].transpose(1, 0, 2, 3))
        self.length[slots] += 1
        return result[self.graph.logits][:, 0]

    def _block_inputs(self, slots: np.ndarray, length: np.ndarray, cache_blocks: np.ndarray):
        """Compute a decode step's block table, mask and block roles into its input arrays;
        return (binding key, inputs, outputs)."""
        n, bs = len(slots), self.block_size
        nb = int(cache_blocks.max())
        table = self._table[: n * nb].reshape(n, nb)
        np.copyto(table, self.table[slots, :nb])
        table[np.arange(nb)[None, :] >= cache_blocks[:, None]] = 0  # past a row's cache
        used = int(table.max()) + 1
        step = min(BINDING_BLOCKS, n)
        P = min(self.num_blocks, -(-used // step) * step)
        # Each pool block below P: the batch row owning it, if its tokens are that row's cache
        # (the block a row's new token goes to is not, yet); -1 otherwise.
        self._row_of_slot[slots] = np.arange(n)
        owner, index = self._owner[:P], self._index[:P]
        np.take(self._row_of_slot, self.block_slot[:P], out=owner)
        self._row_of_slot[slots] = -1
        np.copyto(index, self.block_pos[:P])
        theirs = np.flatnonzero(owner >= 0)
        owner[theirs[index[theirs] >= cache_blocks[owner[theirs]]]] = -1
        # Filled in place: while the key holds, the arrays (and a previous step's IOBinding of
        # them) stay the same.
        key = (n, nb, P)
        if self._bound is None or self._bound[0] != key:
            outs = self._outputs(n) if self.io_binding else None
            self._bound = (key, self._feeds(n, nb, P), outs)
        _, feeds, outs = self._bound
        np.copyto(feeds["block_table"], table)
        block_mask(length, nb, bs, out=feeds["block_mask"])
        roles = (feeds["block_rows"], feeds["block_slots"], feeds["block_weights"])
        block_roles(owner, index, n, nb, out=roles)
        return key, feeds, outs

    def _feeds(self, n: int, nb: int, P: int) -> dict[str, np.ndarray]:
        """Decode input arrays for ``n`` rows, ``nb`` table blocks and pool blocks ``[0, P)``
        (filled by each step), with views of the pool: no copies of the cache."""
        feeds = {
            "input_ids": np.zeros((n, 1), np.int64),
            "position_ids": np.zeros((n, 1), np.int64),
            "causal_mask": np.ones((n, 1, 1), bool),
            "block_table": np.zeros((n, nb), np.int64),
            "block_mask": np.zeros((n, nb, self.block_size), bool),
            "block_rows": np.zeros(P, np.int64),
            "block_slots": np.zeros(P, np.int64),
            "block_weights": np.zeros((n, P), np.dtype(self.graph.dtype)),
        }
        feeds.update((name, self.pool.view(j, P)) for j, (name, _) in enumerate(self.graph.kv))
        return feeds

    def _outputs(self, n: int) -> dict[str, np.ndarray]:
        """Decode outputs for ``n`` rows: views of the preallocated logits and new-K/V arrays."""
        outs = {self.graph.logits: self._logits[:n]}
        outs.update((new, self._new[j, :n]) for j, (_, new) in enumerate(self.graph.kv))
        return outs
