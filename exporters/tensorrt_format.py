"""The ``tensorrt`` export format: the ONNX export plus serialized TensorRT engines.

Importing this module imports neither torch nor tensorrt. ``export`` checks for TensorRT and a
CUDA GPU before doing any work, so where either is missing it fails at once and writes nothing.
"""

from __future__ import annotations

from pathlib import Path

from engine import hookimpl
from exporters.base import ExportFormat


class TensorRTFormat(ExportFormat):
    """ONNX graphs plus one TensorRT engine (``.plan``) per variant, for NVIDIA GPUs."""

    name = "tensorrt"
    description = "TensorRT engines built from the validated ONNX export (needs the gpu extra)"

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
        """Export ONNX, build TensorRT engines from it, and return the new version directory."""
        from exporters.onnx_export import ExportOptions, export_checkpoint
        from exporters.tensorrt_build import EngineBuilder, require_tensorrt

        require_tensorrt()  # before loading anything: a missing GPU must write nothing
        options = ExportOptions(
            fp16=fp16,
            opset=opset,
            max_batch=max_batch,
            max_seq=max_seq,
            force=force,
            validate=validate,
            progress=progress,
        )
        return export_checkpoint(
            Path(ckpt_dir), Path(repo), name, options, fmt=self.name, post=EngineBuilder()
        )


@hookimpl
def engine_register_export_formats():
    """Register the TensorRT export format."""
    return [TensorRTFormat()]
