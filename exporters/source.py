"""What an export starts from: a model loaded from an engine checkpoint or a Hugging Face directory.

Every export format exports a :class:`ModelSource`, so a checkpoint of ours and an imported
Hugging Face model take one path through tracing, validation and the repository.
:func:`open_source` tells the two apart by ``config.json``: ours names an ``architecture`` and
its ``config``; one written by ``save_pretrained`` has ``model_type`` / ``architectures`` and
neither of those keys.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engine.errors import EngineError

CONFIG = "config.json"


class SourceError(EngineError):
    """The path is neither an engine checkpoint nor a Hugging Face model directory."""


@dataclass
class ModelSource:
    """A model ready to export: architecture, config, torch module, and where it came from."""

    arch: Any
    config: Any
    model: Any  # torch.nn.Module in eval mode
    artifacts_dir: Path  # holds what arch.artifact_files() and serving_metadata() read
    plugin: dict[str, Any]  # the manifest's "plugin": which plugin provides the architecture
    provenance: dict[str, Any]  # the manifest's "checkpoint": path, step, or the HF origin
    name: str  # the model's default name in a repository
    reference: Any = None  # another implementation validation compares against (transformers)


def source_kind(path: Path) -> Literal["checkpoint", "huggingface"]:
    """Say whether ``path`` is an engine checkpoint or a Hugging Face model directory."""
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"{path} does not exist or is not a directory")
    config = path / CONFIG
    if not config.is_file():
        raise SourceError(
            f"{path} has no {CONFIG}: it is neither an engine checkpoint (engine train) nor a "
            "Hugging Face model directory (save_pretrained)"
        )
    try:
        raw = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{config} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{config} is not a JSON object")
    if isinstance(raw.get("architecture"), str) and isinstance(raw.get("config"), dict):
        return "checkpoint"
    if "model_type" in raw or "architectures" in raw:
        return "huggingface"
    raise SourceError(
        f"{config} names neither an engine architecture ('architecture' + 'config') nor a "
        "Hugging Face model ('model_type' / 'architectures')"
    )


def checkpoint_source(ckpt_dir: Path) -> ModelSource:
    """Load an engine checkpoint (``engine train`` output) as a source."""
    from engine import checkpoint
    from exporters.provenance import checkpoint_info

    arch, config, model = checkpoint.load(ckpt_dir)
    plugin, provenance = checkpoint_info(ckpt_dir, arch.name)
    return ModelSource(arch, config, model, Path(ckpt_dir), plugin, provenance, arch.name)


@contextlib.contextmanager
def open_source(path: Path) -> Iterator[ModelSource]:
    """Load the model at ``path``, a checkpoint or a Hugging Face directory; clean up after.

    A Hugging Face source's artifacts (tokenizer, labels) are written into a temporary
    directory that lives as long as the context.
    """
    if source_kind(path) == "checkpoint":
        yield checkpoint_source(Path(path))
        return
    from exporters.hf.source import open_hf

    with open_hf(Path(path)) as source:
        yield source
