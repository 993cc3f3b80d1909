"""The KV-cache memory manager: hands out fixed-size blocks of token slots to requests.

It never sees an array or a model: it only knows how many blocks exist, who holds which, and
whether a request fits. The model runner owns the memory and maps block ids to its buffers.
A runner whose graph reads one contiguous cache row per sequence uses ``block_size =
max_model_len``, so each request holds exactly one block and the block id is its row (slot).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from engine.errors import EngineError


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
class KVCacheStats:
    """Usage counters, for metrics and the benchmark's peak-memory report."""

    num_blocks: int
    block_size: int
    bytes_per_block: int
    used_blocks: int
    peak_used_blocks: int
    preemptions: int

    @property
    def free_blocks(self) -> int:
        """Blocks nobody holds."""
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


class KVCacheManager:
    """Allocates blocks of ``block_size`` token slots out of ``num_blocks``, lowest id first.

    Lowest-id-first keeps the used rows packed at the front, so a runner that feeds a
    contiguous range of rows to its graph wastes little on holes.
    """

    def __init__(self, num_blocks: int, block_size: int, bytes_per_block: int = 0):
        if num_blocks < 1 or block_size < 1:
            raise KVCacheConfigError(f"need blocks of tokens, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.bytes_per_block = bytes_per_block
        self._free = list(range(num_blocks))  # a heap
        self._held: dict[str, list[int]] = {}
        self._peak = 0
        self._preemptions = 0

    @classmethod
    def from_budget(
        cls,
        kv_cache_bytes: int,
        spec: KVCacheSpec,
        block_size: int,
        max_blocks: int | None = None,
    ) -> KVCacheManager:
        """Size the pool from a byte budget, capped at ``max_blocks``; raise if no block fits."""
        per_block = spec.bytes_per_token * block_size
        num_blocks = kv_cache_bytes // per_block
        if num_blocks < 1:
            raise KVCacheConfigError(
                f"kv_cache_bytes={kv_cache_bytes} holds no block of {block_size} tokens "
                f"({per_block} bytes); raise it to at least {per_block}"
            )
        if max_blocks is not None:
            num_blocks = min(num_blocks, max_blocks)
        return cls(num_blocks, block_size, per_block)

    # -- queries ------------------------------------------------------------------------------
    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by requests."""
        return self.num_blocks - len(self._free)

    def can_admit(self, num_tokens: int) -> bool:
        """True if a new request of ``num_tokens`` fits in the free blocks."""
        return self.blocks_needed(num_tokens) <= len(self._free)

    def capacity(self, request_id: str) -> int:
        """Tokens the request's blocks can hold."""
        return len(self._held.get(request_id, ())) * self.block_size

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block ids, in token order."""
        return self._held[request_id]

    def holds(self, request_id: str) -> bool:
        """True if the request holds any block."""
        return request_id in self._held

    # -- changes ------------------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's blocks to hold ``num_tokens``; all or nothing. False if full."""
        held = self._held.get(request_id)
        if held is not None and num_tokens <= len(held) * self.block_size:
            return True  # the common decode step: room left in the last block
        held = self._held.setdefault(request_id, [])
        extra = self.blocks_needed(num_tokens) - len(held)
        if extra > len(self._free):
            if not held:
                del self._held[request_id]
            return False
        held.extend(heapq.heappop(self._free) for _ in range(extra))
        self._peak = max(self._peak, self.num_used_blocks)
        return True

    def free(self, request_id: str) -> int:
        """Return all of the request's blocks at once; the number freed (0 if it held none)."""
        blocks = self._held.pop(request_id, [])
        for b in blocks:
            heapq.heappush(self._free, b)
        return len(blocks)

    def record_preemption(self) -> None:
        """Count one preemption (the scheduler calls this when it evicts a request)."""
        self._preemptions += 1

    def stats(self) -> KVCacheStats:
        """A snapshot of the counters."""
        return KVCacheStats(
            self.num_blocks,
            self.block_size,
            self.bytes_per_block,
            self.num_used_blocks,
            self._peak,
            self._preemptions,
        )
