"""The export-format interface and the errors an export can end with (torch-free).

Every error is one failure a user can act on; the CLI prints its message and exits non-zero.
Validation errors follow Optimum's three steps (names, then shapes, then values), plus one per
task-level check (greedy tokens, predicted labels, pixels), but fail instead of warning.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def greedy_agreement(tokens, expected) -> dict[str, Any]:
    """Rows of (B, steps) greedy tokens identical to ``expected``, and the share of equal tokens."""
    same = (tokens == expected).all(axis=1)
    return {
        "identical_prompts": int(same.sum()),
        "token_agreement": float((tokens == expected).mean()),
    }


def require_identical_greedy(tokens, expected, what: str, got: str, ref: str) -> None:
    """Raise :class:`GreedyMismatch` naming the first row and step where ``tokens`` differ."""
    same = (tokens == expected).all(axis=1)
    if same.all():
        return
    row = int(same.argmin())
    step = int((tokens[row] != expected[row]).argmax())
    raise GreedyMismatch(
        f"{what}: greedy tokens differ from {ref}'s on {int((~same).sum())} of {len(same)} "
        f"prompts; prompt {row} first differs at new token {step} ({got} {tokens[row, step]}, "
        f"{ref} {expected[row, step]})"
    )


class UnknownTask(ValidationError):
    """The architecture's task has no task-level check, so its graphs cannot be validated."""


class AgreementTooLow(ValidationError):
    """Top-1 agreement with PyTorch (tokens or labels) is below the required fraction."""


class QuantizedAccuracyTooLow(ValidationError):
    """A quantized graph loses more accuracy against fp32 on held-out data than the floors allow."""


class LabelMismatch(ValidationError):
    """An fp32 classifier graph predicted a different label than PyTorch for some input."""


# fp16 floors, shared by the PyTorch and the transformers checks: near-ties may flip in half
# precision, never more than this
FP16_MIN_TOP1 = 0.99  # teacher-forced top-1 agreement of an fp16 LM graph
FP16_MIN_LABEL_AGREEMENT = 0.995  # labels of an fp16 classifier graph


def require_label_agreement(labels, expected, fp16: bool, what: str, ref: str, unit: str) -> float:
    """Return the fraction of ``labels`` equal to ``expected`` (``ref``'s, over ``unit``).

    fp32: raise :class:`LabelMismatch` if any differs; fp16: raise :class:`AgreementTooLow`
    below :data:`FP16_MIN_LABEL_AGREEMENT`.
    """
    agree = float((labels == expected).mean())
    if not fp16 and agree < 1.0:
        raise LabelMismatch(
            f"{what}: predicted label differs from {ref} on "
            f"{int((labels != expected).sum())} of {labels.size} {unit}"
        )
    if fp16 and agree < FP16_MIN_LABEL_AGREEMENT:
        raise AgreementTooLow(
            f"{what} (fp16): label agreement with {ref} {agree:.2%} is below "
            f"{FP16_MIN_LABEL_AGREEMENT:.1%}; export in fp32"
        )
    return agree


class PixelErrorTooLarge(ValidationError):
    """Generated images differ from PyTorch's by more than the signature's tolerance."""


class TensorRTUnavailable(ExportError):
    """The ``tensorrt`` package or a CUDA GPU is missing, so no engine can be built here."""


class TensorRTBuildFailed(ExportError):
    """TensorRT could not parse the ONNX graph or build an engine from it."""


def copy_artifact(src: Path, dest_dir: Path) -> None:
    """Copy a file or directory the architecture needs at serving time (e.g. its tokenizer)."""
    target = Path(dest_dir) / src.name
    if not src.exists():
        raise ExportError(
            f"the checkpoint lacks {src}, which serving needs; re-train or restore it"
        )
    if target.exists():
        raise ExportError(f"artifact {src.name} would overwrite an exported file of that name")
    if src.is_dir():
        shutil.copytree(src, target)
    else:
        shutil.copy2(src, target)


@dataclass(frozen=True)
class ExportOptions:
    """What ``engine export`` was asked for: one value every format takes (the CLI's flags)."""

    name: str | None = None  # model name in the repository; None: the architecture's name
    fp16: bool = False  # half-precision weights (GPUs; slower on CPU)
    int8: bool = False  # 8-bit weights (MatMulNBits): ~4x smaller, faster on CPU
    opset: int | None = None  # None: exporters.onnx_graph.DEFAULT_OPSET
    max_batch: int = 16  # largest batch a TensorRT profile covers
    max_seq: int | None = None  # None: the model's context length
    force: bool = False  # rebuild the latest version instead of adding one
    validate: bool = True  # check the export against PyTorch before it lands
    progress: bool = True  # a progress line per stage


class ExportFormat(ABC):
    """One way to export a checkpoint into the model repository (``engine export --format``)."""

    name: str
    description: str = ""

    @abstractmethod
    def export(self, ckpt_dir: Path, repo: Path, options: ExportOptions) -> Path:
        """Export ``ckpt_dir`` as a new version of ``repo/<options.name>``; return its directory.

        ``options.force`` overwrites the latest version instead of adding one. Nothing is left
        in ``repo`` when the export fails.
        """


def check_contract(manifest: Any, root: Path | None = None) -> None:
    """Refuse to write a version the server could not load (the serving contract of its task)."""
    from engine.serving_contract import ServingContractError, check_serving

    try:
        check_serving(manifest, f"{manifest.architecture} export", root)
    except ServingContractError as exc:
        raise ExportError(f"{exc}; see 'The serving contract' in docs/plugins.md") from None


def check_serving_keys(arch: Any, serving: dict[str, Any], fmt: str) -> None:
    """The contract's serving keys, before any tracing (the graphs are checked at the end)."""
    from engine.repository import Manifest

    check_contract(Manifest("check", 1, fmt, arch.task, arch.name, serving=serving))
