"""What every export records about where it came from: checkpoint, plugin, library versions.

Shared by the export formats (onnx, tensorrt, torch) so their manifests say the same things the
same way. Torch-free: only the stdlib and the checkpoint's ``config.json``.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

# serving_metadata keys that name the longest sequence a model takes, most specific first
CONTEXT_KEYS = ("context_length", "max_length", "max_seq", "block_size", "n_ctx")


def context_length(serving: dict[str, Any]) -> int | None:
    """The longest sequence the model takes, from its serving metadata (None if it has none)."""
    for key in CONTEXT_KEYS:
        if isinstance(serving.get(key), int):
            return int(serving[key])
    return None


def library_versions(*extra: str) -> dict[str, str]:
    """Versions of the libraries an export depends on (``None`` for ones not installed)."""
    from engine import __version__

    out = {"engine": __version__, "python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "numpy", *extra):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def manifest_header(
    name: str,
    version: int,
    fmt: str,
    arch: Any,
    plugin: dict[str, Any],
    checkpoint: dict[str, Any],
    libraries: dict[str, Any],
) -> dict[str, Any]:
    """The fields every format's manifest starts with: what, when, from which plugin and run."""
    return {
        "name": name,
        "version": version,
        "format": fmt,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "architecture": arch.name,
        "task": arch.task,
        "plugin": plugin,
        "checkpoint": checkpoint,
        "libraries": libraries,
    }


def checkpoint_info(ckpt_dir: Path, arch_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's ``plugin`` and ``checkpoint`` sections for a checkpoint directory."""
    from engine import checkpoint
    from engine.plugins import get_architecture

    meta = checkpoint.read_meta(ckpt_dir)
    _, plugin = get_architecture(arch_name)
    source = {
        "path": str(Path(ckpt_dir).resolve()),
        "step": meta.step,
        "seed": meta.seed,
        "trained_with": {"plugin": meta.plugin, "version": meta.plugin_version},
        "config": meta.config,
    }
    return {"name": plugin.name, "version": plugin.version, "source": plugin.source}, source
