"""Baselines measured in the same run as the server, on the same weights and prompts.

The registry maps a name to ``"module:Class"``; a baseline's module is imported only when that
baseline is asked for, so torch or transformers load only for ``hf`` and ``optimum``. A class
is constructed with the keyword arguments it accepts among :class:`BaselineContext`'s fields
(``repo``, ``model``, ``threads``, ``seed``, ``checkpoint``, ``device``, and the engine settings
``dtype``, ``cuda_graphs``, ``max_num_seqs``, ``gpu_memory_utilization``). Anything that stops a
baseline (a missing package, a missing module, :class:`Unavailable` from its constructor or
``check()``) becomes :class:`Unavailable`, which the bench reports as skipped with the reason.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.baselines.base import Baseline, RequestRecord, Unavailable

REGISTRY: dict[str, str] = {
    "grpc": "bench.loadgen:GrpcRunner",  # the served model, over gRPC (the thing measured)
    "inprocess": "bench.baselines.inprocess:InProcessBaseline",
    "bare": "bench.baselines.bare:BareLoopBaseline",
    "hf": "bench.baselines.hf:HFGenerate",
    "hf-static": "bench.baselines.hf:HFStaticCompiled",  # static cache + torch.compile on CUDA
    "optimum": "bench.baselines.optimum:OptimumORT",
    "llamacpp": "bench.baselines.llamacpp:LlamaCpp",  # GGUF f32 (needs the llamacpp extra)
    "llamacpp-q8_0": "bench.baselines.llamacpp:LlamaCppQ8",  # GGUF q8_0
}


@dataclass(frozen=True)
class BaselineContext:
    """What a baseline may need to build itself: where the weights are and how to run them."""

    repo: Path
    model: str
    threads: int | None = None  # intra-op threads, as the server gets them
    seed: int = 0
    checkpoint: Path | None = None  # the PyTorch checkpoint the ONNX export came from, if known
    device: str = "cpu"
    dtype: str | None = None  # torch dtype name; None: float16 on CUDA, float32 on CPU
    cuda_graphs: bool = True  # the engine's decode steps as CUDA graphs (torch format, CUDA)
    max_num_seqs: int | None = None  # the engine's sequences at once; None: its default
    gpu_memory_utilization: float | None = None  # the engine's KV budget from free GPU memory


def baseline_class(name: str) -> type[Baseline]:
    """The class registered as ``name``; raise :class:`Unavailable` if it cannot be imported."""
    if name not in REGISTRY:
        raise KeyError(name)
    module_name, _, attr = REGISTRY[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # the baseline's module, or a package it needs, is missing
        missing = getattr(exc, "name", None) or str(exc)
        raise Unavailable(f"cannot import {missing} ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise Unavailable(f"{module_name} defines no {attr}") from None


def create(name: str, context: BaselineContext, **extra: object) -> Baseline:
    """Build and check baseline ``name``; raise :class:`Unavailable` (with why) if it cannot run."""
    cls = baseline_class(name)
    values = {**asdict(context), **extra}
    params = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = values
    else:
        kwargs = {k: v for k, v in values.items() if k in params}
    try:
        baseline = cls(**kwargs)
        baseline.check()
    except Unavailable:
        raise
    except ImportError as exc:
        raise Unavailable(f"cannot import {getattr(exc, 'name', None) or exc}") from None
    return baseline


__all__ = [
    "REGISTRY",
    "Baseline",
    "BaselineContext",
    "RequestRecord",
    "Unavailable",
    "baseline_class",
    "create",
]
