"""The KV-cache manager: hands out blocks of ``block_size`` token slots by id, caches prefixes.

vLLM's paged KV cache, as nano-vllm's block manager writes it: memory is a pool of
``num_blocks`` blocks; a request holds one block per ``block_size`` tokens it has, so memory
follows use and a byte budget admits as many sequences as fit. The manager never sees an
array or a model: it hands out ids; the runner owns the memory and maps ids to its buffers.

Prefix caching: a full block is named by a hash chained over its tokens and all tokens before
it. A request's full blocks are registered once computed; when it finishes or is preempted
they stay in the pool as *cached*, evicted least recently used first, and a later request
whose prompt starts with the same tokens gets them instead of recomputing them.

A block has one holder at a time (the runner's graph reads each pool block against one row's
queries; model_runner.py says why), so a hit is a *copy* of the cached block into one of the
request's own blocks: a few hundred KB against recomputing 16 tokens through the whole model.
New blocks are always the lowest ids nobody holds (a cached block there is first moved up into
a free one), so the blocks in use stay packed at the bottom of the pool and a decode step reads
little else. Copies are queued as :class:`BlockCopy` for the runner, which applies them in
order before the step's compute.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import EngineError

FREE, CACHED, HELD = 0, 1, 2  # a block's state


class KVCacheConfigError(EngineError):
    """The KV-cache budget cannot hold even one sequence of the model's context."""


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of a model's keys/values, from which memory per token follows."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 4  # float32 on CPU

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token's keys and values take over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


def default_kv_cache_bytes(spec: KVCacheSpec, max_model_len: int, max_num_seqs: int) -> int:
    """Budget for ``max_num_seqs`` full-context sequences: admission is never memory-bound."""
    return spec.bytes_per_token * max_model_len * max_num_seqs


@dataclass(frozen=True)
class BlockCopy:
    """Copy block ``src``'s keys/values into block ``dst`` (a prefix hit, or a cached block
    moved out of the way of an allocation)."""

    src: int
    dst: int


@dataclass(frozen=True)
class KVCacheStats:
    """Usage counters, for metrics and the benchmark's memory report."""

    num_blocks: int
    block_size: int
    bytes_per_block: int
    used_blocks: int  # held by requests
    cached_blocks: int  # nobody's, holding a cached prefix (reclaimable)
    peak_used_blocks: int
    preemptions: int
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # ... of which found cached

    @property
    def free_blocks(self) -> int:
        """Blocks nobody holds (cached ones included: they are reclaimed on demand)."""
        return self.num_blocks - self.used_blocks

    @property
    def budget_bytes(self) -> int:
        """Bytes of the whole pool."""
        return self.num_blocks * self.bytes_per_block

    @property
    def used_bytes(self) -> int:
        """Bytes held by requests now."""
        return self.used_blocks * self.bytes_per_block

    @property
    def peak_bytes(self) -> int:
        """Most bytes ever held at once."""
        return self.peak_used_blocks * self.bytes_per_block


def block_hashes(token_ids: Sequence[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """Chained hashes of the full blocks of ``token_ids``: block j's names blocks 0..j."""
    out = []
    tokens = np.asarray(token_ids, np.int64)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(tokens[start : start + block_size].tobytes())
        parent = h.digest()
        out.append(parent)
    return out


class KVCacheManager:
    """``num_blocks`` blocks of ``block_size`` tokens; lowest free ids first; LRU prefix cache."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        bytes_per_block: int = 0,
        enable_prefix_caching: bool = True,
    ):
        if num_blocks < 1 or block_size < 1:
            raise KVCacheConfigError(f"need blocks of tokens, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.bytes_per_block = bytes_per_block
        self.enable_prefix_caching = enable_prefix_caching
        self._state = np.zeros(num_blocks, np.int8)
        # Lazy heaps (an entry is live while the block's state matches): the lowest block
        # nobody holds, and the highest free one (where a displaced cached block goes).
        self._unheld = list(range(num_blocks))
        self._free_top = [-b for b in range(num_blocks)]
        heapq.heapify(self._free_top)
        self._num_free = num_blocks
        # Hashes of cached blocks, least recently used first. Keyed by hash, not block: moving
        # a cached block to another place does not change when it was last used.
        self._lru: OrderedDict[bytes, None] = OrderedDict()
        self._hash_of: dict[int, bytes] = {}  # registered block -> its hash
        self._block_of: dict[bytes, int] = {}  # hash -> the registered block holding it
        self._held: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # per request: its full blocks' hashes
        self._copies: list[BlockCopy] = []
        self._grown: dict[str, None] = {}  # requests whose block lists changed (ordered set)
        self._peak = 0
        self._preemptions = 0
        self._queries = 0
        self._hits = 0

    @classmethod
    def from_budget(
        cls,
        kv_cache_bytes: int,
        spec: KVCacheSpec,
        block_size: int,
        max_blocks: int | None = None,
        enable_prefix_caching: bool = True,
    ) -> KVCacheManager:
        """Size the pool from a byte budget, capped at ``max_blocks``; raise if no block fits."""
        num_blocks = cls.blocks_in_budget(kv_cache_bytes, spec, block_size)
        if max_blocks is not None:
            num_blocks = min(num_blocks, max_blocks)
        per_block = spec.bytes_per_token * block_size
        return cls(num_blocks, block_size, per_block, enable_prefix_caching)

    @staticmethod
    def blocks_in_budget(kv_cache_bytes: int, spec: KVCacheSpec, block_size: int) -> int:
        """Blocks of ``block_size`` tokens that ``kv_cache_bytes`` holds; raise if none."""
        per_block = spec.bytes_per_token * block_size
        num_blocks = kv_cache_bytes // per_block
        if num_blocks < 1:
            raise KVCacheConfigError(
                f"kv_cache_bytes={kv_cache_bytes} holds no block of {block_size} tokens "
                f"({per_block} bytes); raise it to at least {per_block}"
            )
        return num_blocks

    # -- queries ------------------------------------------------------------------------------
    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds (free or cached)."""
        return self.num_blocks - self.num_used_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by requests."""
        return self.num_blocks - self._num_free - len(self._lru)

    def capacity(self, request_id: str) -> int:
        """Tokens the request's blocks can hold."""
        return len(self._held.get(request_id, ())) * self.block_size

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block ids, in token order."""
        return self._held[request_id]

    def holds(self, request_id: str) -> bool:
        """True if the request holds any block."""
        return request_id in self._held

    def cached_tokens(self, token_ids: Sequence[int]) -> int:
        """Tokens of a prompt's start that are cached (whole blocks; never the last token,
        whose logits the prefill must compute)."""
        if not self.enable_prefix_caching:
            return 0
        usable = (len(token_ids) - 1) // self.block_size * self.block_size
        hits = 0
        for h in block_hashes(token_ids[:usable], self.block_size):
            if h not in self._block_of:
                break
            hits += 1
        return hits * self.block_size

    def can_admit(self, num_tokens: int) -> bool:
        """True if a request of ``num_tokens`` gets its blocks (free, or cached and reclaimed)."""
        return self.blocks_needed(num_tokens) <= self.num_free_blocks

    # -- changes ------------------------------------------------------------------------------
    def admit(
        self, request_id: str, token_ids: Sequence[int], max_compute: int | None = None
    ) -> int | None:
        """Give a new (or preempted) request blocks for ``token_ids``; return the tokens found
        cached (already in its blocks once the queued copies run). None, and nothing changed,
        if it does not fit or would leave more than ``max_compute`` tokens to compute.
        """
        need = self.blocks_needed(len(token_ids))
        if need > self.num_free_blocks:
            return None
        hashes = block_hashes(token_ids[: self.cached_tokens(token_ids)], self.block_size)
        if need > self.num_free_blocks - sum(h in self._lru for h in hashes):
            hashes = []  # only evicting the hits themselves would make room
        compute = len(token_ids) - len(hashes) * self.block_size
        if max_compute is not None and compute > max_compute:
            return None
        pinned = frozenset(hashes)  # the hits: moved aside if in the way, never evicted
        blocks = [self._take(pinned) for _ in range(need)]
        for dst, h in zip(blocks, hashes):
            src = self._block_of[h]  # looked up now: _take may have moved it
            if src != dst:
                self._copies.append(BlockCopy(src, dst))
        for h in reversed(hashes):  # used again; the head of the prefix is evicted last
            if h in self._lru:
                self._lru.move_to_end(h)
        self._held[request_id] = blocks
        self._hashes[request_id] = hashes
        self._grown[request_id] = None
        cached = len(hashes) * self.block_size
        self._queries += len(token_ids)
        self._hits += cached
        self._peak = max(self._peak, self.num_used_blocks)
        return cached

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Grow a running request's blocks to hold ``num_tokens``; all or nothing."""
        held = self._held[request_id]
        extra = self.blocks_needed(num_tokens) - len(held)
        if extra <= 0:
            return True  # the common decode step: room left in the last block
        if extra > self.num_free_blocks:
            return False
        held.extend(self._take() for _ in range(extra))
        self._grown[request_id] = None
        self._peak = max(self._peak, self.num_used_blocks)
        return True

    def commit(self, request_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Register the request's blocks that ``num_computed`` computed tokens filled."""
        if not self.enable_prefix_caching:
            return
        hashes = self._hashes[request_id]
        full = num_computed // self.block_size
        if full <= len(hashes):
            return
        start = len(hashes) * self.block_size
        parent = hashes[-1] if hashes else b""
        new = block_hashes(token_ids[start : full * self.block_size], self.block_size, parent)
        blocks = self._held[request_id]
        for j, h in enumerate(new, start=len(hashes)):
            if h not in self._block_of:  # the first block computed with it is the one kept
                self._block_of[h] = blocks[j]
                self._hash_of[blocks[j]] = h
        hashes.extend(new)

    def free(self, request_id: str) -> int:
        """Return the request's blocks; registered ones stay cached. The number returned."""
        blocks = self._held.pop(request_id, [])
        self._hashes.pop(request_id, None)
        self._grown.pop(request_id, None)
        for b in reversed(blocks):  # a sequence's tail is evicted before its head
            h = self._hash_of.get(b)
            if h is not None:
                self._state[b] = CACHED
                self._lru[h] = None
                heapq.heappush(self._unheld, b)
            else:
                self._release(b)
        return len(blocks)

    def record_preemption(self) -> None:
        """Count one preemption (the scheduler calls this when it evicts a request)."""
        self._preemptions += 1

    def take_copies(self) -> list[BlockCopy]:
        """The block copies queued since the last call, in the order they must run."""
        copies, self._copies = self._copies, []
        return copies

    def take_grown(self) -> dict[str, list[int]]:
        """Requests whose block lists changed since the last call, with their lists now."""
        grown = {rid: self._held[rid] for rid in self._grown if rid in self._held}
        self._grown = {}
        return grown

    def stats(self) -> KVCacheStats:
        """A snapshot of the counters."""
        return KVCacheStats(
            self.num_blocks,
            self.block_size,
            self.bytes_per_block,
            self.num_used_blocks,
            len(self._lru),
            self._peak,
            self._preemptions,
            self._queries,
            self._hits,
        )

    # -- blocks -------------------------------------------------------------------------------
    def _release(self, b: int) -> None:
        self._state[b] = FREE
        self._num_free += 1
        heapq.heappush(self._unheld, b)
        heapq.heappush(self._free_top, -b)

    def _uncache(self, h: bytes) -> int:
        """Forget cached hash ``h``; return the block that held it."""
        del self._lru[h]
        b = self._block_of.pop(h)
        del self._hash_of[b]
        return b

    def _take(self, pinned: frozenset[bytes] = frozenset()) -> int:
        """The lowest block nobody holds, now held; a cached block there is moved or evicted."""
        while self._state[self._unheld[0]] == HELD:
            heapq.heappop(self._unheld)
        b = heapq.heappop(self._unheld)
        if self._state[b] == CACHED:
            self._displace(b, pinned)
        else:
            self._num_free -= 1
        self._state[b] = HELD
        return b

    def _displace(self, b: int, pinned: frozenset[bytes]) -> None:
        """Move cached block ``b``'s content out of the way: into the highest free block, else
        into the place of the least recently used cached block (evicting that one)."""
        h = self._hash_of[b]
        while self._free_top and self._state[-self._free_top[0]] != FREE:
            heapq.heappop(self._free_top)
        if self._free_top:
            dst = -heapq.heappop(self._free_top)
            self._num_free -= 1
        else:  # evict the least recently used cached block (pinned ones are being hit)
            victim = next((v for v in self._lru if v not in pinned), None)
            if victim is None or victim == h:  # b's own prefix is the one to go
                self._uncache(h)
                return
            dst = self._uncache(victim)
        self._copies.append(BlockCopy(b, dst))
        del self._hash_of[b]
        self._state[dst] = CACHED
        self._hash_of[dst], self._block_of[h] = h, dst
