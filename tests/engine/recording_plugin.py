"""A plugin that implements every hook with objects recording what the engine calls on them.

Registered through ENGINE_PLUGINS by tests/engine/test_hook_docs.py. ``CALLS`` collects
``"hook.<name>"`` when the engine calls a hook, ``"arch.<method>"`` for every Architecture
method the engine calls, ``"format.export"`` and ``"backend.load"``/``"backend.run"``.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

from engine import hookimpl
from engine.architecture import Architecture
from engine.runtime.backends import Backend, BackendFactory, BackendOptions, OnnxRuntimeFactory
from exporters.base import ExportFormat, ExportOptions
from exporters.onnx_format import OnnxFormat
from tests.exporters.tiny_arch import TinyClassifier

ARCH, FORMAT, BACKEND = "recording-classifier", "recording-onnx", "recording-onnxruntime"
CALLS: list[str] = []
CONTRACT = sorted(
    n for n, f in vars(Architecture).items() if inspect.isfunction(f) and not n.startswith("_")
)


def _recorded(name: str, method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        CALLS.append(f"arch.{name}")
        return method(self, *args, **kwargs)

    return wrapper


class RecordingClassifier(TinyClassifier):
    """The tiny export-test classifier with every contract method recording its calls."""

    name = ARCH


for _name in CONTRACT:  # inherited defaults (steps, with_steps, ...) are recorded too
    setattr(RecordingClassifier, _name, _recorded(_name, getattr(TinyClassifier, _name)))


class RecordingFormat(ExportFormat):
    """The ``onnx`` format under another name."""

    name = FORMAT
    description = "onnx, recording that it ran"

    def export(self, ckpt_dir: Path, repo: Path, options: ExportOptions) -> Path:
        CALLS.append("format.export")
        return OnnxFormat().export(ckpt_dir, repo, options)


class RecordingBackend(Backend):
    """onnxruntime, recording each run."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name = BACKEND
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def run(self, feeds, out=None, binding_key=None):
        CALLS.append("backend.run")
        return self.inner.run(feeds, out, binding_key)


class RecordingBackendFactory(BackendFactory):
    """Loads ``.onnx`` graphs with onnxruntime and records it."""

    name = BACKEND
    suffix = ".onnx"

    def unavailable_reason(self, device: str) -> str | None:
        return OnnxRuntimeFactory().unavailable_reason(device)

    def load(self, path: Path, options: BackendOptions) -> Backend:
        CALLS.append("backend.load")
        return RecordingBackend(OnnxRuntimeFactory().load(path, options))


@hookimpl
def engine_register_architectures():
    """Register the recording classifier."""
    CALLS.append("hook.engine_register_architectures")
    return [RecordingClassifier()]


@hookimpl
def engine_register_export_formats():
    """Register the recording export format."""
    CALLS.append("hook.engine_register_export_formats")
    return [RecordingFormat()]


@hookimpl
def engine_register_backends():
    """Register the recording backend."""
    CALLS.append("hook.engine_register_backends")
    return [RecordingBackendFactory()]
