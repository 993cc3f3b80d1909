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

import contextlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine import hookimpl
from exporters.base import ExportError, ExportFormat, ExportOptions, ValuesMismatch

FORMAT = "torch"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATIC_DECODE = "forward_static"  # the method the torch runtime decodes with


class TorchFormat(ExportFormat):
    """Safetensors weights + config for ``engine serve`` on torch (CUDA graphs on a GPU)."""

    name = FORMAT
    description = "safetensors weights for the torch runtime (GPU hosts; CUDA graphs)"

    def export(self, ckpt_dir: Path, repo: Path, options: ExportOptions) -> Path:
        """Write the weights of ``ckpt_dir`` as a new version of ``repo``; return its directory.

        ``fp16`` stores half-precision weights (half the file); ``opset`` and ``max_batch``
        concern graphs and are ignored. ``validate`` reloads the written weights and checks
        they are bitwise the ones exported.
        """
        from exporters.progress import Stages
        from exporters.source import open_source

        if options.int8:
            raise ExportError("--int8 is an ONNX export (MatMulNBits for onnxruntime on CPUs)")
        with Stages(options.progress) as stages, contextlib.ExitStack() as stack:
            with stages.stage("load model"):
                source = stack.enter_context(open_source(Path(ckpt_dir)))
            _check_servable(source.arch, source.model)
            name = options.name or source.name
            return _write_version(source, Path(repo) / name, stages, options)


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


def _write_version(source: Any, model_dir: Path, stages: Any, options: ExportOptions) -> Path:
    import torch
    from safetensors.torch import save_model

    from engine.atomic import write_json
    from engine.configs import config_to_dict
    from engine.repository import Manifest, staged_version, write_manifest
    from exporters.base import check_contract, check_serving_keys, copy_artifact
    from exporters.provenance import context_length, library_versions, manifest_header

    arch, config, model, ckpt_dir = source.arch, source.config, source.model, source.artifacts_dir
    serving = arch.serving_metadata(config, ckpt_dir)
    check_serving_keys(arch, serving, FORMAT)
    name = model_dir.name
    with staged_version(model_dir.parent, name, options.force) as (tmp, version):
        for src in arch.artifact_files(ckpt_dir):  # first: a missing tokenizer fails fast
            copy_artifact(Path(src), tmp)
        with stages.stage("write weights"):
            if options.fp16:
                model.to(torch.float16)
            save_model(model, str(tmp / WEIGHTS))  # de-duplicates tied weights
            # the checkpoint's config.json form, so engine.checkpoint.load opens the version
            write_json(
                tmp / CONFIG,
                {
                    "architecture": arch.name,
                    "task": arch.task,
                    "plugin": source.plugin.get("name", "?"),
                    "plugin_version": source.plugin.get("version", "?"),
                    "step": source.provenance.get("step", 0),
                    "seed": source.provenance.get("seed", 0),
                    "config": config_to_dict(config),
                },
            )
        validation: dict[str, Any] = {"validated": False, "reason": "skipped with --no-validate"}
        if options.validate:
            with stages.stage("validate"):
                validation = _reload_matches(tmp, model)
        with stages.stage("write"):
            libraries = library_versions("safetensors")
            manifest = Manifest(
                **manifest_header(
                    name, version, FORMAT, arch, source.plugin, source.provenance, libraries
                ),
                precision="fp16" if options.fp16 else "fp32",
                export_options=asdict(options),
                max_seq=options.max_seq or context_length(serving),
                serving=serving,
                validation=validation,
                sections={
                    "weights": {
                        "file": WEIGHTS,
                        "config": CONFIG,
                        "parameters": sum(p.numel() for p in model.parameters()),
                        "decode": STATIC_DECODE,
                    },
                    "timings_s": dict(stages.seconds),
                },
            )
            check_contract(manifest, tmp)
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
