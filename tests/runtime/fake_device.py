"""A numpy-backed stand-in for a GPU's memory that records every host<->device copy.

Its "device" arrays are host memory of a marked ndarray subclass, so onnxruntime's CPU
execution provider can bind them by pointer exactly as the CUDA one binds real device memory
(``ort_device`` is "cpu"), and tests can tell what crossed over: ``copies`` lists each
``to_device`` / ``to_host`` with its size and what it carried.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.runtime.device import DeviceLayer


class FakeDeviceArray(np.ndarray):
    """Memory on the fake device; slicing, indexing and arithmetic stay on it."""


class FakeDevice(DeviceLayer):
    """Device arrays that are numpy arrays underneath, with a log of every copy."""

    ort_device = "cpu"

    def __init__(self) -> None:
        self.copies: list[tuple[str, int, tuple[int, ...]]] = []  # (direction, bytes, shape)
        self.syncs = 0

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> FakeDeviceArray:
        """Zeros on the device (no copy)."""
        return np.zeros(shape, np.dtype(dtype)).view(FakeDeviceArray)

    def to_device(self, host: np.ndarray) -> FakeDeviceArray:
        """A host-to-device copy, logged."""
        host = np.asarray(host)
        self.copies.append(("h2d", host.nbytes, host.shape))
        return np.array(host).view(FakeDeviceArray)

    def to_host(self, array: Any) -> np.ndarray:
        """A device-to-host copy, logged."""
        self.copies.append(("d2h", array.nbytes, tuple(array.shape)))
        return np.array(array).view(np.ndarray)

    def is_device(self, array: Any) -> bool:
        """An array of this device."""
        return isinstance(array, FakeDeviceArray)

    def pointer(self, array: Any) -> int:
        """The array's address (host memory, which onnxruntime's CPU provider reads)."""
        assert array.flags.c_contiguous, "only contiguous arrays can be bound"
        return array.ctypes.data

    def synchronize(self) -> None:
        """Counted, nothing to wait for."""
        self.syncs += 1

    def copied(self, direction: str) -> int:
        """Bytes copied so far in ``direction`` (h2d or d2h)."""
        return sum(n for d, n, _ in self.copies if d == direction)
