"""GPU backends bind device arrays by pointer and copy only host arrays (through fakes, on CPU).

onnxruntime: the real CPU session with the fake device (its memory is host memory, bound by
pointer as CUDA memory would be), and a recording IOBinding for the CUDA device type. TensorRT:
the native backend's run with a recording engine context and CUDA runtime.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.runtime.backends import BackendOptions, OnnxRuntimeBackend
from engine.runtime.loader import open_version
from tests.runtime.conftest import MODEL
from tests.runtime.fake_device import FakeDevice


@pytest.fixture(scope="module")
def default_graph(lm_repo, lm_checkpoint):
    """The tiny LM's concatenating graph, and example feeds with a cache of 5 tokens."""
    from engine import checkpoint

    arch, config, _ = checkpoint.load(lm_checkpoint)
    mv = open_version(lm_repo, MODEL)
    feeds = arch.example_inputs(config, 3, 1, 5, seed=1, variant="default")
    return mv.path / mv.graph("default")["file"], feeds


class RecordingBinding:
    """Stands in for an onnxruntime IOBinding and logs every call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


def _is_kv(name: str) -> bool:
    return name.startswith(("past_key_values.", "present."))


def test_device_arrays_are_bound_by_pointer_and_filled_in_place(default_graph, monkeypatch):
    path, feeds = default_graph
    fake = FakeDevice()
    monkeypatch.setattr(OnnxRuntimeBackend, "_device_layer", staticmethod(lambda provider: fake))
    backend = OnnxRuntimeBackend(path, BackendOptions(intra_op_threads=1, spin=False))
    assert backend.device is fake
    plain = backend.run(feeds)  # no out: numpy in, numpy out
    on_device = {n: fake.to_device(a) if _is_kv(n) else a for n, a in feeds.items()}
    out = {
        n: fake.zeros(a.shape, a.dtype) if _is_kv(n) else np.zeros_like(a) for n, a in plain.items()
    }
    before = list(fake.copies)
    for _ in range(2):  # the second run reuses the device bindings
        got = backend.run(on_device, out, binding_key="step")
    assert fake.copies == before  # nothing crossed during the runs
    for name, ref in plain.items():
        assert got[name] is out[name] and fake.is_device(got[name]) == _is_kv(name)
        np.testing.assert_allclose(np.asarray(got[name]), ref, rtol=1e-5, atol=1e-5)


def test_on_cuda_device_memory_is_bound_as_cuda_and_host_inputs_every_run():
    class CudaLike(FakeDevice):
        ort_device = "cuda"

    dev = CudaLike()
    backend = OnnxRuntimeBackend.__new__(OnnxRuntimeBackend)
    backend.device, backend._bound_key = dev, None
    backend._binding = binding = RecordingBinding()
    backend.session = type("Session", (), {"run_with_iobinding": lambda self, b: None})()
    pool, ids = dev.zeros((4, 2, 16, 8), np.float16), np.zeros((2, 1), np.int64)
    new, logits = dev.zeros((2, 2, 1, 8), np.float16), np.zeros((2, 1, 9), np.float32)
    feeds, out = {"cache.0.key": pool, "input_ids": ids}, {"new.0.key": new, "logits": logits}
    backend.run(feeds, out, binding_key=(2, 1))
    assert binding.calls == [
        ("bind_input", "cache.0.key", "cuda", 0, pool.dtype, [4, 2, 16, 8], pool.ctypes.data),
        ("bind_cpu_input", "input_ids", ids),
        ("bind_output", "new.0.key", "cuda", 0, new.dtype, [2, 2, 1, 8], new.ctypes.data),
        ("bind_output", "logits", "cpu", 0, logits.dtype, [2, 1, 9], logits.ctypes.data),
        ("synchronize_outputs",),
    ]
    binding.calls.clear()
    backend.run(feeds, out, binding_key=(2, 1))  # same key: only the host input again
    assert binding.calls == [("bind_cpu_input", "input_ids", ids), ("synchronize_outputs",)]


class _Context:
    """A TensorRT execution context that records addresses and shapes."""

    def __init__(self, shapes):
        self.shapes, self.addresses, self.inputs = shapes, {}, {}

    def set_input_shape(self, name, shape):
        self.inputs[name] = tuple(shape)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def execute_async_v3(self, stream):
        return True


class _Cuda:
    """The CUDA runtime calls of the native backend, recorded."""

    def __init__(self):
        self.copies, self.stream = [], type("Stream", (), {"value": 1})()

    def malloc(self, nbytes):
        return type("Ptr", (), {"value": 1000 + nbytes})()

    def copy(self, dst, src, nbytes, kind):
        self.copies.append((kind, nbytes))

    def sync(self):
        pass

    def free(self, ptr):
        pass


def test_tensorrt_binds_device_arrays_and_copies_only_host_ones():
    from engine.runtime import tensorrt_backend as trt_backend

    dev = FakeDevice()
    backend = trt_backend.TensorRTBackend.__new__(trt_backend.TensorRTBackend)
    backend.device, backend._cuda, backend._buffers = dev, _Cuda(), {}
    backend.input_names, backend.output_names = (
        ["input_ids", "cache.0.key"],
        ["logits", "new.0.key"],
    )
    backend._dtypes = {"input_ids": np.dtype(np.int64), "cache.0.key": np.dtype(np.float16)}
    backend._dtypes |= {"logits": np.dtype(np.float32), "new.0.key": np.dtype(np.float16)}
    backend.context = _Context({"logits": (2, 1, 9), "new.0.key": (2, 2, 1, 8)})
    pool, new = dev.zeros((4, 2, 16, 8), np.float16), dev.zeros((2, 2, 1, 8), np.float16)
    ids, logits = np.zeros((2, 1), np.int64), np.zeros((2, 1, 9), np.float32)
    got = backend.run({"input_ids": ids, "cache.0.key": pool}, {"logits": logits, "new.0.key": new})
    assert got["new.0.key"] is new and got["logits"] is logits
    ctx = backend.context
    assert (
        ctx.addresses["cache.0.key"] == pool.ctypes.data and ctx.inputs["cache.0.key"] == pool.shape
    )
    assert ctx.addresses["new.0.key"] == new.ctypes.data
    # one host-to-device copy (the ids) and one device-to-host copy (the logits): no cache
    assert backend._cuda.copies == [
        (trt_backend._H2D, ids.nbytes),
        (trt_backend._D2H, logits.nbytes),
    ]
    with pytest.raises(ValueError, match="device array given"):
        backend.run(
            {"input_ids": ids, "cache.0.key": pool}, {"new.0.key": dev.zeros((1,), np.float16)}
        )
    assert dev.copies == []


def test_the_cuda_providers_need_cupy_and_the_cpu_has_no_device(monkeypatch, default_graph):
    import sys

    from engine.runtime.device import device_for
    from engine.runtime.errors import BackendUnavailableError

    assert device_for("CPUExecutionProvider") is None
    monkeypatch.setitem(sys.modules, "cupy", None)  # as where cupy is not installed
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        with pytest.raises(BackendUnavailableError, match="pip install cupy-cuda12x"):
            device_for(provider)
    path, _ = default_graph
    monkeypatch.setattr(OnnxRuntimeBackend, "_device_layer", staticmethod(lambda p: FakeDevice()))
    host = OnnxRuntimeBackend(path, BackendOptions(intra_op_threads=1, kv_on_device=False))
    assert host.device is None  # the KV cache stays in host memory, as before
