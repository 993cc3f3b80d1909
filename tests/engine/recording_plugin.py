"""A plugin that implements every hook with objects recording what the engine calls on them.

Registered through ENGINE_PLUGINS by tests/engine/test_hook_docs.py. ``CALLS`` collects
``"hook.<name>"`` when the engine calls a hook, ``"arch.<method>"`` for every Architecture
method the engine calls, ``"format.export"``, ``"backend.load"``/``"backend.run"`` and
``"family.converts"`` (``engine convert`` asked the Hugging Face family).
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import numpy as np

from engine import hookimpl
from engine.architecture import Architecture
from engine.hf_family import HFFamily
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

    def heldout_examples(self, config, ckpt_dir: Path):
        """Random rows labeled 0 (``engine export --int8`` scores the int8 graph on them)."""
        feeds = self.example_inputs(config, batch=16, seq=5, past=0)
        return feeds, np.zeros(16, dtype=np.int64)


for _name in CONTRACT:  # inherited defaults (steps, with_steps, ...) are recorded too
    setattr(RecordingClassifier, _name, _recorded(_name, getattr(RecordingClassifier, _name)))


class RecordingFamily(HFFamily):
    """A made-up transformers class for the recording classifier; it converts nothing."""

    hf_architecture, model_type = "RecordingForSequenceClassification", "recording"
    architecture, auto_class = ARCH, "AutoModelForSequenceClassification"

    def converts(self, config) -> bool:
        CALLS.append("family.converts")
        return True

    def unsupported(self, hf_config):
        return ["nothing maps onto the recording classifier"]

    def config_from_hf(self, hf_config, tokenizer):
        raise NotImplementedError

    def weights_from_hf(self, tensors, config):
        raise NotImplementedError

    def write_artifacts(self, hf_config, tokenizer, out_dir: Path) -> None:
        raise NotImplementedError


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


@hookimpl
def engine_register_hf_families():
    """Register the recording family."""
    CALLS.append("hook.engine_register_hf_families")
    return [RecordingFamily()]
