"""Where a runner keeps keys and values: one pool of blocks per graph KV tensor.

The pool is the KV cache's memory, sized once from the byte budget (``num_blocks`` blocks of
``block_size`` tokens) and never reallocated. Block ids come from the KV-cache manager, which
knows nothing of this layout. :class:`HostKVPool` is numpy arrays that the graph reads in
place (onnxruntime binds them without a copy); :class:`DeviceKVPool` keeps the same five
operations over GPU memory, for the backends that compute there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.runtime.kv_cache import BlockCopy


class HostKVPool:
    """``num_tensors`` pools of ``num_blocks`` blocks, each (heads, block_size, head_dim)."""

    def __init__(
        self,
        num_tensors: int,
        num_blocks: int,
        num_heads: int,
        block_size: int,
        head_dim: int,
        dtype: np.dtype | str = np.float32,
    ):
        self.block_size = block_size
        # One array for every tensor (row j is the graph's j-th KV pair), so a step writes all
        # new keys/values with one indexed assignment.
        shape = (num_tensors, num_blocks, num_heads, block_size, head_dim)
        self.blocks = np.zeros(shape, np.dtype(dtype))

    @property
    def nbytes(self) -> int:
        """Bytes of the whole pool (the KV budget)."""
        return self.blocks.nbytes

    def view(self, tensor: int, count: int) -> np.ndarray:
        """Blocks ``[0, count)`` of one tensor, (count, H, bs, D): what a decode step reads."""
        return self.blocks[tensor, :count]

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """A copy of the given blocks of every tensor, (K, len(ids), H, bs, D)."""
        return self.blocks[:, ids]

    def write(self, blocks: np.ndarray, offsets: np.ndarray, new: np.ndarray) -> None:
        """Store token keys/values ``new`` (n, K, H, D) at ``offsets`` within ``blocks``."""
        self.blocks[:, blocks, :, offsets, :] = new  # advanced indices first: (n, K, H, D)

    def copy(self, copies: Sequence[BlockCopy]) -> None:
        """Apply block copies in order (a later copy may read what an earlier one wrote)."""
        for c in copies:
            self.blocks[:, c.dst] = self.blocks[:, c.src]


class DeviceKVPool:
    """:class:`HostKVPool`'s five operations over GPU memory: the cache never leaves the device.

    ``device`` is the backend's :class:`~engine.runtime.device.DeviceLayer`; its arrays index
    and assign as numpy's do, on the device. The block ids and offsets the runner computes on
    the host are the only things copied in (a few bytes per token); the keys/values written
    must already be on the device (the graph's new-K/V outputs are bound to device arrays).
    """

    def __init__(
        self,
        device,
        num_tensors: int,
        num_blocks: int,
        num_heads: int,
        block_size: int,
        head_dim: int,
        dtype: np.dtype | str = np.float32,
    ):
        self.device, self.block_size = device, block_size
        shape = (num_tensors, num_blocks, num_heads, block_size, head_dim)
        self.blocks = device.zeros(shape, np.dtype(dtype))

    @property
    def nbytes(self) -> int:
        """Bytes of the whole pool (the KV budget)."""
        return int(self.blocks.nbytes)

    def index(self, ids: np.ndarray):
        """Host index array ``ids`` where the pool's indexing reads it (copied to the device)."""
        return self.device.to_device(np.ascontiguousarray(ids, np.int64))

    def view(self, tensor: int, count: int):
        """Blocks ``[0, count)`` of one tensor, (count, H, bs, D), on the device (no copy)."""
        return self.blocks[tensor, :count]

    def gather(self, ids: np.ndarray):
        """A device copy of the given blocks of every tensor, (K, len(ids), H, bs, D).

        ``take`` gives a C-contiguous copy, so each tensor's part can be bound by pointer.
        """
        return self.blocks.take(self.index(ids), axis=1)

    def write(self, blocks: np.ndarray, offsets: np.ndarray, new) -> None:
        """Store device keys/values ``new`` (n, K, H, D) at ``offsets`` within ``blocks``."""
        if not self.device.is_device(new):
            raise TypeError("the keys/values written into a device pool must be on the device")
        self.blocks[:, self.index(blocks), :, self.index(offsets), :] = new

    def copy(self, copies: Sequence[BlockCopy]) -> None:
        """Apply block copies in order, device to device."""
        for c in copies:
            self.blocks[:, c.dst] = self.blocks[:, c.src]
