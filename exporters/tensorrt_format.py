"""The ``tensorrt`` export format: the ONNX export plus serialized TensorRT engines.

Importing this module imports neither torch nor tensorrt. ``export`` checks for TensorRT and a
CUDA GPU before doing any work, so where either is missing it fails at once and writes nothing.
"""

from __future__ import annotations

from pathlib import Path

from engine import hookimpl
from exporters.base import ExportFormat, ExportOptions


class TensorRTFormat(ExportFormat):
    """ONNX graphs plus one TensorRT engine (``.plan``) per variant, for NVIDIA GPUs."""

    name = "tensorrt"
    description = "TensorRT engines built from the validated ONNX export (needs the gpu extra)"

    def export(self, ckpt_dir: Path, repo: Path, options: ExportOptions) -> Path:
        """Export ONNX, build TensorRT engines from it, and return the new version directory."""
        from exporters.onnx_export import export_checkpoint
        from exporters.tensorrt_build import EngineBuilder, require_tensorrt

        require_tensorrt()  # before loading anything: a missing GPU must write nothing
        return export_checkpoint(
            Path(ckpt_dir), Path(repo), options, fmt=self.name, post=EngineBuilder()
        )


@hookimpl
def engine_register_export_formats():
    """Register the TensorRT export format."""
    return [TensorRTFormat()]
