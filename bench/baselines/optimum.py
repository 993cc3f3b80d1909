"""Optimum's ``ORTModelForCausalLM``: the same GPT-2 exported by Optimum, run by onnxruntime.

The model is :mod:`bench.baselines.hf`'s ``GPT2LMHeadModel`` (same weights), saved to a
temporary directory and exported there by Optimum (``export=True``: its own ONNX graph with a
KV cache), then driven through the same ``generate`` call, batching and timestamps as ``hf``.
It measures what the Hugging Face ONNX stack gives on our weights.

Optimum's ONNX support lives in ``optimum-onnx``, whose only release (0.1.0) pins
``transformers<4.58`` and ``optimum~=2.1.0``; that in turn caps ``tokenizers`` at 0.23.0 and
``huggingface_hub`` below 1.0. It is its own extra (``.[optimum]``) for that reason: where it
is not installed, constructing :class:`OptimumORT` says so and the bench reports it skipped.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from bench.baselines.hf import HFGenerate, load_gpt2

INSTALL = "pip install -e '.[optimum]'"
PINS = (
    "optimum-onnx 0.1.0 (its only release) needs transformers>=4.36,<4.58 and optimum~=2.1.0, "
    "hence tokenizers<=0.23.0 and huggingface_hub<1.0"
)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def unavailable_reason(device: str = "cpu") -> str | None:
    """Why Optimum's onnxruntime models cannot run here (None if they can)."""
    try:
        from optimum.onnxruntime import ORTModelForCausalLM  # noqa: F401
    except ImportError as exc:
        return f"optimum-onnx is not importable ({exc}). {PINS}; install it with {INSTALL}"
    import onnxruntime

    provider = PROVIDERS.get(device.split(":")[0])
    if provider is None:
        return f"the optimum baseline runs on cpu or cuda, not {device!r}"
    if provider not in onnxruntime.get_available_providers():
        return f"this onnxruntime has no {provider} (the gpu extra installs onnxruntime-gpu)"
    return None


class OptimumORT(HFGenerate):
    """``ORTModelForCausalLM.generate`` on an Optimum export of the same GPT-2 weights."""

    name = "optimum"
    description = "Optimum ORTModelForCausalLM (onnxruntime) generate, greedy, static batches"

    @staticmethod
    def why_unavailable(device: str) -> str | None:
        """Why not here: transformers, optimum-onnx or the device's provider is missing."""
        return HFGenerate.why_unavailable(device) or unavailable_reason(device)

    def _load(self) -> tuple[Any, int]:
        """Export the Hugging Face model with Optimum into a temporary directory and load it."""
        import onnxruntime
        from optimum.onnxruntime import ORTModelForCausalLM

        hf, pad_id = load_gpt2(self.weights, "cpu", dtype=None)  # exported in fp32, on the CPU
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        self._dir = tempfile.TemporaryDirectory(prefix="optimum-export-")
        hf.save_pretrained(self._dir.name)
        ort_model = ORTModelForCausalLM.from_pretrained(
            self._dir.name,
            export=True,
            use_cache=True,
            provider=PROVIDERS[self.device.split(":")[0]],
            session_options=options,
        )
        ort_model.generation_config.bos_token_id = None
        ort_model.generation_config.eos_token_id = None  # exactly output_len tokens
        ort_model.generation_config.pad_token_id = pad_id
        return ort_model, pad_id

    def describe(self) -> dict[str, Any]:
        """Versions of optimum, optimum-onnx and onnxruntime besides the hf fields."""
        from importlib import metadata

        import onnxruntime

        out = {**super().describe(), "onnxruntime": onnxruntime.__version__, "dtype": "float32"}
        for dist in ("optimum", "optimum-onnx"):
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                out[dist] = None
        return out

    def close(self) -> None:
        """Drop the sessions and the exported files."""
        super().close()
        if getattr(self, "_dir", None) is not None:
            self._dir.cleanup()
            self._dir = None
