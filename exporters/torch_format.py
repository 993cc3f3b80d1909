"""The ``torch`` export format: the checkpoint's weights as safetensors, for the torch runtime.

A version holds ``model.safetensors``, the checkpoint's ``config.json`` (architecture and
config, so :func:`engine.checkpoint.load` opens a version as it opens a checkpoint), the
artifacts serving needs (the tokenizer) and ``manifest.json`` with every file's sha256. No graph
is traced: the runtime rebuilds the module through the architecture plugin and decodes with a
static KV cache (``engine/runtime/torch_runner.py``; CUDA graphs on a GPU). It is the format
for GPU hosts that have torch but no TensorRT, and the weights the Hugging Face baselines load.

Importing this module imports no torch; ``export`` loads it when it runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from engine import hookimpl
from exporters.base import ExportError, ExportFormat, ValuesMismatch

FORMAT = "torch"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATIC_DECODE = "forward_static"  # the method the torch runtime decodes with


class TorchFormat(ExportFormat):
    """Safetensors weights + config for ``engine serve`` on torch (CUDA graphs on a GPU)."""

    name = FORMAT
    description = "safetensors weights for the torch runtime (GPU hosts; CUDA graphs)"

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
        """Write the weights of ``ckpt_dir`` as a new version of ``repo/name``; return its dir.

        ``fp16`` stores half-precision weights (half the file); ``opset`` and ``max_batch``
        concern graphs and are ignored. ``validate`` reloads the written weights and checks
        they are bitwise the ones exported.
        """
        from engine import checkpoint
        from exporters.progress import Stages

        with Stages(progress) as stages:
            with stages.stage("load checkpoint"):
                arch, config, model = checkpoint.load(Path(ckpt_dir))
            _check_servable(arch, model)
            return _write_version(
                arch,
                config,
                model,
                Path(ckpt_dir),
                Path(repo) / (name or arch.name),
                stages,
                fp16=fp16,
                max_seq=max_seq,
                force=force,
                validate=validate,
            )


def _check_servable(arch: Any, model: Any) -> None:
    """Refuse architectures the torch runtime cannot serve, before anything is written."""
    if arch.task != "generate":
        raise ExportError(
            f"the torch format is served by the generate runtime only; {arch.name} serves "
            f"{arch.task!r}: export it with --format onnx"
        )
    if not callable(getattr(model, STATIC_DECODE, None)):
        raise ExportError(
            f"{arch.name}'s module has no {STATIC_DECODE}() method, which the torch runtime "
            "decodes with; export it with --format onnx"
        )


def _write_version(
    arch: Any,
    config: Any,
    model: Any,
    ckpt_dir: Path,
    model_dir: Path,
    stages: Any,
    *,
    fp16: bool,
    max_seq: int | None,
    force: bool,
    validate: bool,
) -> Path:
    import torch
    from safetensors.torch import save_model

    from exporters.provenance import (
        checkpoint_info,
        context_length,
        library_versions,
        manifest_header,
    )
    from exporters.repository import copy_artifact, staged_version, write_manifest

    serving = arch.serving_metadata(config, ckpt_dir)
    plugin, source = checkpoint_info(ckpt_dir, arch.name)
    name = model_dir.name
    with staged_version(model_dir.parent, name, force) as (tmp, version):
        for src in arch.artifact_files(ckpt_dir):  # first: a missing tokenizer fails fast
            copy_artifact(Path(src), tmp)
        with stages.stage("write weights"):
            if fp16:
                model.to(torch.float16)
            save_model(model, str(tmp / WEIGHTS))  # de-duplicates tied weights
            shutil.copy2(ckpt_dir / CONFIG, tmp / CONFIG)
        validation: dict[str, Any] = {"validated": False, "reason": "skipped with --no-validate"}
        if validate:
            with stages.stage("validate"):
                validation = _reload_matches(tmp, model)
        with stages.stage("write"):
            manifest = {
                **manifest_header(
                    name, version, FORMAT, arch, plugin, source, library_versions("safetensors")
                ),
                "precision": "fp16" if fp16 else "fp32",
                "max_seq": max_seq or context_length(serving),
                "weights": {
                    "file": WEIGHTS,
                    "config": CONFIG,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "decode": STATIC_DECODE,
                },
                "serving": serving,
                "validation": validation,
                "timings_s": dict(stages.seconds),
            }
            write_manifest(tmp, manifest)
    return model_dir / str(version)


def _reload_matches(version_tmp: Path, model: Any) -> dict[str, Any]:
    """Load the written version like the runtime does; its weights must equal ``model``'s."""
    import torch

    from engine import checkpoint

    _, _, reloaded = checkpoint.load(version_tmp)
    ours = model.state_dict()
    theirs = reloaded.state_dict()
    differ = [
        k for k, v in ours.items() if not torch.equal(theirs[k].to(v.dtype), v.to(theirs[k].device))
    ]
    if differ:
        raise ValuesMismatch(f"reloaded weights differ from the checkpoint's: {differ[:5]}")
    return {"validated": True, "tensors": len(ours), "reload": "bitwise equal"}


@hookimpl
def engine_register_export_formats():
    """Register the torch export format."""
    return [TorchFormat()]
