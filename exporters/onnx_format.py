"""The ``onnx`` export format, registered through the same hook as a third-party plugin.

Importing this module imports neither torch nor onnx; ``export`` loads them when it runs.
"""

from __future__ import annotations

from pathlib import Path

from engine import hookimpl
from exporters.base import ExportFormat, ExportOptions


class OnnxFormat(ExportFormat):
    """Validated ONNX graphs (fp32 or fp16) for onnxruntime, one per architecture variant."""

    name = "onnx"
    description = "ONNX graphs validated against PyTorch (onnxruntime CPU/CUDA)"

    def export(self, ckpt_dir: Path, repo: Path, options: ExportOptions) -> Path:
        """Export ``ckpt_dir`` as ONNX into a new version of ``repo``; return its directory."""
        from exporters.onnx_export import export_checkpoint

        return export_checkpoint(Path(ckpt_dir), Path(repo), options, fmt=self.name)


@hookimpl
def engine_register_export_formats():
    """Register the ONNX export format."""
    return [OnnxFormat()]
