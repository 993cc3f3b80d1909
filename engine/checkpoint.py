"""Checkpoint directories: ``model.safetensors``, ``config.json``, ``metrics.json``, artifacts.

A checkpoint is written whole into a temporary sibling and renamed into place, so a crash
never leaves a half-written directory where a good one was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.configs import ConfigError, config_to_dict, make_config
from engine.errors import EngineError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
TRAINER_STATE = "trainer_state.pt"


class CheckpointError(EngineError):
    """Raised when a checkpoint directory is missing, incomplete or corrupt."""


@dataclass
class CheckpointMeta:
    """What ``config.json`` records besides the hyperparameters."""

    architecture: str
    plugin: str
    plugin_version: str
    step: int
    seed: int
    config: dict[str, Any]
    extra: dict[str, Any]


def read_meta(ckpt_dir: Path) -> CheckpointMeta:
    """Read and check ``config.json`` of a checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint {ckpt_dir} does not exist or is not a directory")
    path = ckpt_dir / CONFIG
    try:
        raw = json.loads(path.read_text())
        return CheckpointMeta(
            architecture=raw["architecture"],
            plugin=raw.get("plugin", "?"),
            plugin_version=raw.get("plugin_version", "?"),
            step=int(raw.get("step", 0)),
            seed=int(raw.get("seed", 0)),
            config=dict(raw["config"]),
            extra={k: v for k, v in raw.items() if k not in ("architecture", "config")},
        )
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir} is not a checkpoint: {CONFIG} is missing") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from None


def write(
    out_dir: Path,
    *,
    arch: Any,
    plugin: Any,
    config: Any,
    model: Any,
    data: Any,
    step: int,
    seed: int,
    metrics: dict[str, Any] | None,
    trainer_state: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint directory atomically and return its path."""
    import torch
    from safetensors.torch import save_model

    from engine import __version__
    from engine.atomic import staged_dir, write_json

    out_dir = Path(out_dir)
    with staged_dir(out_dir, replace=True) as tmp:
        save_model(model, str(tmp / WEIGHTS))  # de-duplicates tied weights
        meta = {
            "architecture": arch.name,
            "task": arch.task,
            "plugin": plugin.name,
            "plugin_version": plugin.version,
            "engine_version": __version__,
            "torch_version": torch.__version__,
            "step": step,
            "seed": seed,
            "config": config_to_dict(config),
            **(extra or {}),
        }
        write_json(tmp / CONFIG, meta)
        if metrics is not None:
            write_json(tmp / METRICS, metrics)
        arch.save_artifacts(data, tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
    return out_dir


def load(ckpt_dir: Path, device: str = "cpu") -> tuple[Any, Any, Any]:
    """Load a checkpoint: return (architecture, config, model in eval mode on ``device``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from engine.plugins import get_architecture

    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    arch, _ = get_architecture(meta.architecture)
    try:
        config = make_config(arch.config_class, meta.config)
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt_dir / CONFIG}: {exc}") from None
    model = arch.build_model(config)
    weights = ckpt_dir / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{ckpt_dir} is incomplete: {WEIGHTS} is missing")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=device)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or does not match the config: {exc}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match {meta.architecture}'s config: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.to(device).eval()
    return arch, config, model
