"""The runner factory: which runner serves a model version (ONNX or torch), and its KV shape.

A ``torch``-format version runs on :class:`~engine.runtime.torch_runner.TorchRunner` (the only
import of torch on the serving side); every other version on the ``kv_inplace`` ONNX graph
through :class:`~engine.runtime.model_runner.ModelRunner`. The runner is built once the KV
pool's size is known, so the factory returns the KV shape first and a builder of the runner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.runtime.backends import BackendOptions
from engine.runtime.errors import BackendUnavailableError
from engine.runtime.kv_cache import KVCacheSpec
from engine.runtime.loader import ModelVersion
from engine.runtime.model_runner import InplaceGraph, ModelRunner

if TYPE_CHECKING:
    from engine.runtime.llm_engine import EngineConfig

INPLACE_VARIANT = "kv_inplace"
TORCH_FORMAT = "torch"  # versions of this format run on engine/runtime/torch_runner.py

RunnerFactory = Callable[[int], Any]  # number of KV slots -> a runner


def runner_factory(
    mv: ModelVersion,
    max_len: int,
    config: EngineConfig,
    *,
    device: str = "cpu",
    backend: str | None = None,
    threads: int | None = None,
    spin: bool = True,
) -> tuple[KVCacheSpec, RunnerFactory]:
    """The KV shape of ``mv``'s runner and a function that builds it for a number of slots."""
    if serves_with_torch(mv, backend):
        return _torch_runner(mv, max_len, device, threads, config)
    return _onnx_runner(mv, max_len, device, backend, threads, spin, config)


def serves_with_torch(mv: ModelVersion, backend: str | None) -> bool:
    """True for a ``torch``-format version; a backend that cannot load the format is an error."""
    fmt = mv.manifest.format
    if fmt == TORCH_FORMAT:
        if backend not in (None, TORCH_FORMAT):
            raise BackendUnavailableError(
                f"{mv.path} holds torch weights, which only the torch backend runs "
                f"(not {backend!r}); export with --format onnx for other backends"
            )
        return True
    if backend == TORCH_FORMAT:
        raise BackendUnavailableError(
            f"{mv.path} holds {fmt or 'onnx'} graphs, not torch weights; export the checkpoint "
            "with --format torch for the torch backend"
        )
    return False


def _onnx_runner(
    mv: ModelVersion,
    max_len: int,
    device: str,
    backend: str | None,
    threads: int | None,
    spin: bool,
    config: EngineConfig,
) -> tuple[KVCacheSpec, RunnerFactory]:
    """The KV shape of the ``kv_inplace`` graph and a factory of its :class:`ModelRunner`."""
    serving = mv.serving
    graph = InplaceGraph.from_manifest(mv.graph(INPLACE_VARIANT))
    itemsize = np.dtype(graph.dtype).itemsize
    spec = KVCacheSpec(len(graph.kv) // 2, graph.num_heads, graph.head_dim, itemsize)

    def make(num_slots: int) -> ModelRunner:
        options = BackendOptions(device=device, intra_op_threads=threads, spin=spin)
        return ModelRunner(
            mv.load(INPLACE_VARIANT, options, backend),
            graph,
            num_slots,
            max_len,
            int(serving["vocab_size"]),
            int(serving.get("pad_token_id", 0)),
            config.io_binding,
        )

    return spec, make


def _torch_runner(
    mv: ModelVersion, max_len: int, device: str, threads: int | None, config: EngineConfig
) -> tuple[KVCacheSpec, RunnerFactory]:
    """The KV shape in the chosen dtype and a factory of the :class:`TorchRunner`."""
    from engine.runtime import torch_runner  # the only import of torch on the serving side

    dtype = torch_runner.resolve_dtype(config.dtype, torch_runner.resolve_device(device))

    def make(num_slots: int) -> Any:
        return torch_runner.TorchRunner.from_version(
            mv,
            num_slots,
            max_len,
            device=device,
            dtype=config.dtype,
            threads=threads,
            cuda_graphs=config.cuda_graphs,
        )

    return torch_runner.kv_spec(mv.serving, dtype), make
