"""Backends: run one exported graph, named numpy arrays in, named numpy arrays out.

Two are built in, registered through ``engine_register_backends`` like any plugin's:

* ``onnxruntime`` runs ``.onnx`` graphs with a provider list chosen by device (CPU; CUDA and
  the TensorRT execution provider where the installed onnxruntime has them). With ``out``
  arrays given, results are written straight into them through an IOBinding.

A backend on a GPU has a ``device`` (:class:`engine.runtime.device.DeviceLayer`): feeds and
outputs may then be device arrays of that layer, bound by pointer and never copied (the runner
keeps the KV cache so), next to host numpy arrays, which are copied in or out each run.
* ``tensorrt`` runs serialized ``.plan`` engines natively (:mod:`engine.runtime.tensorrt_backend`).

Nothing here imports torch: this module is on the serving path.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine import hookimpl
from engine.runtime.errors import BackendUnavailableError

DEVICES = ("cpu", "cuda", "tensorrt")  # what --device accepts


@dataclass(frozen=True)
class BackendOptions:
    """How a backend runs: the device and, on CPU, its threads. Set once per session."""

    device: str = "cpu"
    intra_op_threads: int | None = None  # None: one per core (os.cpu_count())
    inter_op_threads: int = 1  # decode graphs are a chain of ops: nothing to run side by side
    spin: bool = True  # busy-wait between ops: lower latency, but burns a shared core
    kv_on_device: bool = True  # GPU backends: the runner keeps the KV cache in device memory


class Backend(ABC):
    """One loaded graph."""

    name: str
    input_names: list[str]
    output_names: list[str]
    device: Any = None  # a DeviceLayer where this backend computes on a GPU; None: host memory

    @abstractmethod
    def run(
        self,
        feeds: dict[str, np.ndarray],
        out: dict[str, np.ndarray] | None = None,
        binding_key: Hashable | None = None,
    ) -> dict[str, np.ndarray]:
        """Run once. ``out`` holds preallocated output arrays of the exact shapes to fill.

        ``binding_key``: the caller promises that a call with the same key as the previous one
        passes the very same arrays (same memory, same shapes), so a backend that binds memory
        may skip binding again. Contents may have changed in place.
        """

    def close(self) -> None:  # noqa: B027 - optional hook; most backends hold nothing to free
        """Release the graph's resources (device memory); the default has none to release."""


class BackendFactory(ABC):
    """What a plugin registers: a name, the file type it loads, and a loader."""

    name: str
    suffix: str  # ".onnx" or ".plan"
    description: str = ""

    @abstractmethod
    def unavailable_reason(self, device: str) -> str | None:
        """Why this backend cannot run on ``device`` here, or None if it can."""

    @abstractmethod
    def load(self, path: Path, options: BackendOptions) -> Backend:
        """Load the graph at ``path``."""


# -- onnxruntime ---------------------------------------------------------------------------------
_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def onnxruntime_providers(device: str) -> list[str]:
    """The provider list for ``device``; raise if the installed onnxruntime lacks its first one."""
    import onnxruntime as ort

    if device not in _PROVIDERS:
        raise BackendUnavailableError(f"unknown device {device!r}; choose one of {DEVICES}")
    wanted = _PROVIDERS[device]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise BackendUnavailableError(
            f"device {device!r} needs onnxruntime's {wanted[0]}, but this onnxruntime has only "
            f"{', '.join(available)}; install onnxruntime-gpu (the gpu extra) on a CUDA machine "
            "or use --device cpu"
        )
    return [p for p in wanted if p in available]


_shared_pool_threads: int | None = None  # set by share_thread_pool
_shared_pool_lock = threading.Lock()


def share_thread_pool(threads: int) -> int:
    """From now on, every onnxruntime session of this process runs on one intra-op pool.

    A session with a pool of its own leaves its workers spinning after each run, so a server
    holding three models has three pools fighting over the same cores (measured: each session
    30-50% slower). ``engine serve`` calls this before loading its models. The shared pool
    spins (onnxruntime's Python API cannot turn that off) and, once it exists, onnxruntime
    refuses sessions with pools of their own: every later session joins it, whatever threads
    or spinning its options ask. Returns the pool's size (the first call's ``threads``).
    """
    global _shared_pool_threads
    import onnxruntime as ort

    with _shared_pool_lock:
        if _shared_pool_threads is None:
            ort.set_global_thread_pool_sizes(threads, 1)
            _shared_pool_threads = threads
        return _shared_pool_threads


def shared_thread_pool() -> int | None:
    """The shared pool's size, or None while sessions have pools of their own."""
    return _shared_pool_threads


class OnnxRuntimeBackend(Backend):
    """An ``onnxruntime.InferenceSession`` with session options fixed at load."""

    name = "onnxruntime"

    def __init__(self, path: Path, options: BackendOptions):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if shared_thread_pool() is not None:
            so.use_per_session_threads = False  # the process-wide pool (thread counts unset)
        else:
            so.intra_op_num_threads = options.intra_op_threads or os.cpu_count() or 1
            so.inter_op_num_threads = options.inter_op_threads
            spinning = "1" if options.spin else "0"
            so.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # warnings about unused initializers are noise to a user
        self.providers = onnxruntime_providers(options.device)
        self.session = ort.InferenceSession(str(path), so, providers=self.providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._binding = self.session.io_binding()
        self._bound_key: Hashable | None = None
        if options.kv_on_device:
            self.device = self._device_layer(self.providers[0])

    @staticmethod
    def _device_layer(provider: str) -> Any:
        """The device layer of the first execution provider (None for the CPU)."""
        from engine.runtime.device import device_for

        return device_for(provider)

    def run(
        self,
        feeds: dict[str, np.ndarray],
        out: dict[str, np.ndarray] | None = None,
        binding_key: Hashable | None = None,
    ) -> dict[str, np.ndarray]:
        """Run once; with ``out``, inputs and outputs are bound to the given arrays (no copies).

        CPU bindings reference the arrays' memory, so an unchanged ``binding_key`` reuses them.
        On a GPU, device arrays are bound by pointer (reused likewise), while host inputs are
        bound again every run: onnxruntime copies a host input to the device when it is bound.
        """
        if out is None:
            self._bound_key = None
            return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        b, dev = self._binding, self.device
        rebind = binding_key is None or binding_key != self._bound_key
        for name, array in feeds.items():
            on_device = dev is not None and dev.is_device(array)
            if on_device and rebind:
                shape = list(array.shape)
                b.bind_input(
                    name, dev.ort_device, dev.device_id, array.dtype, shape, dev.pointer(array)
                )
            elif not on_device and (rebind or dev is not None):
                b.bind_cpu_input(name, array)
        if rebind:
            for name, array in out.items():
                if dev is not None and dev.is_device(array):
                    where, ptr = (dev.ort_device, dev.device_id), dev.pointer(array)
                else:
                    where, ptr = ("cpu", 0), array.ctypes.data
                b.bind_output(name, *where, array.dtype, list(array.shape), ptr)
            self._bound_key = binding_key
        self.session.run_with_iobinding(b)
        if dev is not None:
            b.synchronize_outputs()  # device outputs are complete before anything reads them
        return out


class OnnxRuntimeFactory(BackendFactory):
    """Loads ``.onnx`` graphs into onnxruntime."""

    name = "onnxruntime"
    suffix = ".onnx"
    description = "onnxruntime (CPU; CUDA / TensorRT execution providers with onnxruntime-gpu)"

    def unavailable_reason(self, device: str) -> str | None:
        """None if onnxruntime has the provider ``device`` needs."""
        try:
            onnxruntime_providers(device)
        except BackendUnavailableError as exc:
            return str(exc)
        return None

    def load(self, path: Path, options: BackendOptions) -> Backend:
        """Create the session."""
        return OnnxRuntimeBackend(path, options)


class TensorRTFactory(BackendFactory):
    """Loads serialized TensorRT engines (``.plan``); needs ``tensorrt`` and a CUDA GPU."""

    name = "tensorrt"
    suffix = ".plan"
    description = "native TensorRT engines (.plan) on an NVIDIA GPU"

    def unavailable_reason(self, device: str) -> str | None:
        """None where tensorrt imports and a CUDA device answers."""
        from engine.runtime.tensorrt_backend import unavailable_reason

        return unavailable_reason()

    def load(self, path: Path, options: BackendOptions) -> Backend:
        """Deserialize the engine."""
        from engine.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(path, kv_on_device=options.kv_on_device)


BUILTIN_BACKENDS = (OnnxRuntimeFactory(), TensorRTFactory())


@hookimpl
def engine_register_backends():
    """Register the onnxruntime and native TensorRT backends."""
    return list(BUILTIN_BACKENDS)


def registered_backends() -> dict[str, BackendFactory]:
    """Backends from the plugin manager, plus the built-ins if their module is not listed there."""
    from engine.plugins import backends

    found = {f.name: f for f in BUILTIN_BACKENDS}
    found.update(backends())
    return found


def get_backend_factory(name: str) -> BackendFactory:
    """Look a backend up by name; an unknown name lists the known ones."""
    known = registered_backends()
    if name not in known:
        raise BackendUnavailableError(f"unknown backend {name!r}; known: {', '.join(known)}")
    return known[name]


def choose_backend(device: str, has_plan: bool) -> str:
    """The default backend for a device: native TensorRT where a .plan exists for it."""
    return "tensorrt" if device == "tensorrt" and has_plan else "onnxruntime"
