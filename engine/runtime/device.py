"""Device memory for the GPU backends, behind one small interface (torch-free).

A backend that computes on a GPU (onnxruntime's CUDA or TensorRT execution provider, native
TensorRT) has a :class:`DeviceLayer`. The runner then keeps the KV pool in device memory
(:class:`engine.runtime.kv_pool.DeviceKVPool`), the backend binds it to the graph by pointer,
and the new tokens' keys/values are bound to device outputs and scattered into the pool on the
device: the cache never crosses to the host. What does cross each step is small: token ids,
positions and block tables (host inputs the backend copies in), index arrays for the scatter,
and the logits (a host output).

:class:`CupyDevice` is the implementation, on cupy (``cupy-cuda12x``, or ``cupy-cuda13x`` on
CUDA 13; in the ``gpu`` extra): its arrays index and assign as numpy's do, on the device.
``tests/runtime/fake_device.py`` is a numpy-backed stand-in that records every copy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from engine.runtime.errors import BackendUnavailableError

CUPY_HINT = (
    "pip install cupy-cuda12x (cupy-cuda13x with CUDA 13; both in the gpu extra), or run with "
    "the KV cache on the host (BackendOptions(kv_on_device=False))"
)


class DeviceLayer(ABC):
    """Allocation, the two copies, and what a backend needs to bind a device array."""

    ort_device: str = "cuda"  # onnxruntime's device_type for these arrays' memory
    device_id: int = 0

    @abstractmethod
    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A zero-filled array in device memory."""

    @abstractmethod
    def to_device(self, host: np.ndarray) -> Any:
        """Copy a host array to the device (small things only: indices, never the cache)."""

    @abstractmethod
    def to_host(self, array: Any) -> np.ndarray:
        """Copy a device array to the host."""

    @abstractmethod
    def is_device(self, array: Any) -> bool:
        """True for an array of this layer (bound by pointer, never copied)."""

    @abstractmethod
    def pointer(self, array: Any) -> int:
        """The device address of a C-contiguous array."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for the device work queued so far (the scatter, before the next graph run)."""


class CupyDevice(DeviceLayer):
    """Device arrays from cupy on GPU ``device_id``."""

    def __init__(self, device_id: int = 0):
        try:
            import cupy
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the GPU backends keep the KV cache in device memory with cupy, which is not "
                f"installed ({exc}); {CUPY_HINT}"
            ) from None
        self.cp, self.device_id = cupy, device_id
        self._device = cupy.cuda.Device(device_id)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """``cupy.zeros`` on this GPU."""
        with self._device:
            return self.cp.zeros(shape, np.dtype(dtype))

    def to_device(self, host: np.ndarray) -> Any:
        """``cupy.asarray``: one host-to-device copy."""
        with self._device:
            return self.cp.asarray(host)

    def to_host(self, array: Any) -> np.ndarray:
        """``cupy.asnumpy``: one device-to-host copy."""
        return self.cp.asnumpy(array)

    def is_device(self, array: Any) -> bool:
        """A cupy array."""
        return isinstance(array, self.cp.ndarray)

    def pointer(self, array: Any) -> int:
        """The array's device address."""
        if not array.flags.c_contiguous:
            raise ValueError("only C-contiguous device arrays can be bound")
        return int(array.data.ptr)

    def synchronize(self) -> None:
        """Wait for cupy's current stream."""
        self.cp.cuda.get_current_stream().synchronize()


def device_for(provider: str, device_id: int = 0) -> DeviceLayer | None:
    """The device layer for onnxruntime execution provider ``provider``; None on the CPU."""
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return CupyDevice(device_id)
    return None
