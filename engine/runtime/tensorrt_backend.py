"""Native TensorRT backend: runs a serialized ``.plan`` engine on numpy arrays, without torch.

Device memory and copies go through the CUDA runtime library via ctypes (``libcudart``, which
the ``tensorrt`` wheels bring along), so the serving path needs neither torch nor cuda-python.
Device buffers are kept per tensor and only grown, so steady-state steps allocate nothing.
Feeds and outputs that are already device arrays (``self.device``: the KV pool and the new
keys/values the runner keeps on the GPU) are bound by address and never copied.
Written against the TensorRT 10 Python API (named tensors, ``execute_async_v3``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from collections.abc import Hashable
from pathlib import Path

import numpy as np

from engine.runtime.backends import Backend
from engine.runtime.errors import BackendUnavailableError

_H2D, _D2H = 1, 2  # cudaMemcpyKind
_INSTALL = "install the gpu extra (pip install -e '.[gpu]': tensorrt>=10) on an NVIDIA GPU machine"


def _load_cudart() -> ctypes.CDLL:
    """Find libcudart: the system's, or the copy shipped in the nvidia-* / tensorrt wheels."""
    names = [ctypes.util.find_library("cudart")]
    try:
        import tensorrt_libs  # the TensorRT 10 wheels' shared libraries

        root = Path(tensorrt_libs.__file__).parent
        names += glob.glob(str(root / "libcudart.so*"))
    except ImportError:
        pass
    try:
        import nvidia.cuda_runtime as runtime  # nvidia-cuda-runtime-cu12

        names += glob.glob(os.path.join(list(runtime.__path__)[0], "lib", "libcudart.so*"))
    except ImportError:
        pass
    names += ["libcudart.so", "libcudart.so.12", "libcudart.so.13"]
    for name in filter(None, names):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise BackendUnavailableError(f"the CUDA runtime library (libcudart) was not found; {_INSTALL}")


def unavailable_reason() -> str | None:
    """Why native TensorRT cannot run here (no package, no CUDA runtime, no GPU), or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"the 'tensorrt' package is not installed ({exc}); {_INSTALL}"
    try:
        cudart = _load_cudart()
    except BackendUnavailableError as exc:
        return str(exc)
    count = ctypes.c_int(0)
    if cudart.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value == 0:
        return "no CUDA GPU is visible (cudaGetDeviceCount found none)"
    return None


class _Cuda:
    """The few CUDA runtime calls the backend needs, each checked."""

    def __init__(self) -> None:
        self.lib = _load_cudart()
        self.stream = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(self.stream)), "cudaStreamCreate")

    def check(self, status: int, what: str) -> None:
        if status != 0:
            self.lib.cudaGetErrorString.restype = ctypes.c_char_p
            msg = self.lib.cudaGetErrorString(status).decode()
            raise BackendUnavailableError(f"{what} failed: CUDA error {status} ({msg})")

    def malloc(self, nbytes: int) -> ctypes.c_void_p:
        ptr = ctypes.c_void_p()
        size = ctypes.c_size_t(max(nbytes, 1))
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), size), "cudaMalloc")
        return ptr

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        status = self.lib.cudaMemcpyAsync(
            ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), kind, self.stream
        )
        self.check(status, "cudaMemcpyAsync")

    def sync(self) -> None:
        self.check(self.lib.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def free(self, ptr: ctypes.c_void_p) -> None:
        self.lib.cudaFree(ptr)


class TensorRTBackend(Backend):
    """A deserialized engine with one execution context and reusable device buffers."""

    name = "tensorrt"

    def __init__(self, path: Path, kv_on_device: bool = True):
        reason = unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"cannot load {Path(path).name} with TensorRT: {reason}")
        import tensorrt as trt

        if kv_on_device:
            from engine.runtime.device import CupyDevice

            self.device = CupyDevice(0)

        self._trt = trt
        self._cuda = _Cuda()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise BackendUnavailableError(
                f"TensorRT could not deserialize {path}: it was built for another TensorRT "
                "version or GPU; re-export with --format tensorrt on this machine"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._buffers: dict[str, tuple[ctypes.c_void_p, int]] = {}

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (None, 0))
        if ptr is None or size < nbytes:
            if ptr is not None:
                self._cuda.free(ptr)
            ptr, size = self._cuda.malloc(nbytes), max(nbytes, 1)
            self._buffers[name] = (ptr, size)
        return ptr.value

    def run(
        self,
        feeds: dict[str, np.ndarray],
        out: dict[str, np.ndarray] | None = None,
        binding_key: Hashable | None = None,
    ) -> dict[str, np.ndarray]:
        """Copy host inputs in, execute on the backend's stream, copy host outputs out.

        Device arrays (of ``self.device``) are bound by address: no copy either way.
        """
        dev = self.device
        keep = []  # host arrays must live until the stream synchronizes
        for name in self.input_names:
            array = feeds[name]
            if dev is not None and dev.is_device(array):
                self.context.set_input_shape(name, tuple(array.shape))
                self.context.set_tensor_address(name, dev.pointer(array))
                continue
            host = np.ascontiguousarray(array, dtype=self._dtypes[name])
            keep.append(host)
            self.context.set_input_shape(name, host.shape)
            ptr = self._buffer(name, host.nbytes)
            self._cuda.copy(ptr, host.ctypes.data, host.nbytes, _H2D)
            self.context.set_tensor_address(name, ptr)
        results, copy_back = {}, []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            given = out.get(name) if out is not None else None
            if dev is not None and dev.is_device(given):
                if tuple(given.shape) != shape:
                    raise ValueError(
                        f"output {name!r} is {shape}, the device array given is {given.shape}"
                    )
                self.context.set_tensor_address(name, dev.pointer(given))
                results[name] = given
                continue
            host = given if given is not None and given.shape == shape else None
            if host is None:
                host = np.empty(shape, self._dtypes[name])
            results[name] = host
            copy_back.append(name)
            self.context.set_tensor_address(name, self._buffer(name, host.nbytes))
        if not self.context.execute_async_v3(self._cuda.stream.value):
            raise BackendUnavailableError("TensorRT engine execution failed (see its log above)")
        for name in copy_back:
            host = results[name]
            self._cuda.copy(host.ctypes.data, self._buffers[name][0].value, host.nbytes, _D2H)
        self._cuda.sync()
        return results

    def close(self) -> None:
        """Free the device buffers."""
        for ptr, _ in self._buffers.values():
            self._cuda.free(ptr)
        self._buffers.clear()
