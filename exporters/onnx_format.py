"""The ``onnx`` export format, registered through the same hook as a third-party plugin.

Importing this module imports neither torch nor onnx; ``export`` loads them when it runs.
"""

from __future__ import annotations

from pathlib import Path

from engine import hookimpl
from exporters.base import ExportFormat


class OnnxFormat(ExportFormat):
    """Validated ONNX graphs (fp32 or fp16) for onnxruntime, one per architecture variant."""

    name = "onnx"
    description = "ONNX graphs validated against PyTorch (onnxruntime CPU/CUDA)"

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
        """Export ``ckpt_dir`` as ONNX into a new version of ``repo/name``; return its directory."""
        from exporters.onnx_export import ExportOptions, export_checkpoint

        options = ExportOptions(
            fp16=fp16,
            opset=opset,
            max_batch=max_batch,
            max_seq=max_seq,
            force=force,
            validate=validate,
            progress=progress,
        )
        return export_checkpoint(Path(ckpt_dir), Path(repo), name, options, fmt=self.name)


@hookimpl
def engine_register_export_formats():
    """Register the ONNX export format."""
    return [OnnxFormat()]
