"""The export-format interface and the errors an export can end with (torch-free).

Every error is one failure a user can act on; the CLI prints its message and exits non-zero.
Validation errors follow Optimum's three steps (names, then shapes, then values), plus one per
task-level check (greedy tokens, predicted labels, pixels), but fail instead of warning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from engine.errors import EngineError


class ExportError(EngineError):
    """An export could not be completed; nothing was written to the repository."""


class TraceFailed(ExportError):
    """Neither the dynamo nor the TorchScript exporter could turn the module into ONNX."""


class ValidationError(ExportError):
    """The exported graph does not reproduce the PyTorch module (base of the checks below)."""


class OutputNamesMismatch(ValidationError):
    """The graph's input or output names differ from the architecture's export signature."""


class ShapeMismatch(ValidationError):
    """An output's shape differs from PyTorch's or from the signature for some input sizes."""


class ValuesMismatch(ValidationError):
    """An output differs from PyTorch's by more than the signature's tolerance."""


class GreedyMismatch(ValidationError):
    """Greedy decoding through the graph and its KV cache picked different tokens than PyTorch."""


class AgreementTooLow(ValidationError):
    """Top-1 agreement with PyTorch (tokens or labels) is below the required fraction."""


class LabelMismatch(ValidationError):
    """An fp32 classifier graph predicted a different label than PyTorch for some input."""


class PixelErrorTooLarge(ValidationError):
    """Generated images differ from PyTorch's by more than the signature's tolerance."""


class TensorRTUnavailable(ExportError):
    """The ``tensorrt`` package or a CUDA GPU is missing, so no engine can be built here."""


class TensorRTBuildFailed(ExportError):
    """TensorRT could not parse the ONNX graph or build an engine from it."""


class RepositoryError(EngineError):
    """A model repository is missing, malformed, or holds no such model or version."""


class VersionExists(RepositoryError):
    """The version directory to write already exists (another export got there first)."""


class ManifestError(RepositoryError):
    """A version's ``manifest.json`` is missing or cannot be read."""


class ChecksumMismatch(RepositoryError):
    """A file in a version directory is missing or its sha256 differs from the manifest."""


class ExportFormat(ABC):
    """One way to export a checkpoint into the model repository (``engine export --format``)."""

    name: str
    description: str = ""

    @abstractmethod
    def export(
        self,
        ckpt_dir: Path,
        repo: Path,
        name: str | None = None,
        fp16: bool = False,
        opset: int | None = None,
        max_batch: int = 16,
        max_seq: int | None = None,
        force: bool = False,
        validate: bool = True,
        progress: bool = True,
    ) -> Path:
        """Export ``ckpt_dir`` as a new version of ``repo/name`` and return the version directory.

        ``name`` defaults to the architecture's name. ``force`` overwrites the latest version
        instead of adding one. Nothing is left in ``repo`` when the export fails.
        """
