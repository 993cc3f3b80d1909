"""The runner factory: which runner serves a model version (ONNX or torch), and its KV shape.

A ``torch``-format version runs on :class:`~engine.runtime.torch_runner.TorchRunner` (the only
import of torch on the serving side); every other version on the paged ``kv_inplace`` ONNX
graph through :class:`~engine.runtime.model_runner.ModelRunner`. The runner is built once the
KV pool's size is known, so the factory returns the KV shape and block size first and a
builder of the runner for a number of slots (requests at once) and of KV blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.runtime.backends import BackendOptions
from engine.runtime.errors import BackendUnavailableError
from engine.runtime.kv_cache import KVCacheConfigError, KVCacheSpec, default_kv_cache_bytes
from engine.runtime.loader import ModelVersion
from engine.runtime.model_runner import InplaceGraph, ModelRunner

if TYPE_CHECKING:
    from engine.runtime.llm_engine import EngineConfig

INPLACE_VARIANT = "kv_inplace"
TORCH_FORMAT = "torch"  # versions of this format run on engine/runtime/torch_runner.py

_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
TORCH_BLOCK_SIZE = 16  # the torch runner's blocks are accounting only (its cache is static)


@dataclass(frozen=True)
class RunnerFactory:
    """What the engine needs before the runner exists: the KV shape, the block size, a builder."""

    spec: KVCacheSpec
    block_size: int
    build: Callable[[int, int], Any]  # (slots, KV blocks) -> a runner
    # False: the runner keeps one static row of the whole context per slot, so the budget
    # buys whole-context slots and a sequence never outgrows its row (the torch runner).
    paged: bool = True


def runner_factory(
    mv: ModelVersion,
    max_len: int,
    config: EngineConfig,
    *,
    device: str = "cpu",
    backend: str | None = None,
    threads: int | None = None,
    spin: bool = True,
) -> RunnerFactory:
    """The KV shape and block size of ``mv``'s runner and a builder of it."""
    if serves_with_torch(mv, backend):
        return _torch_runner(mv, max_len, device, threads, config)
    return _onnx_runner(mv, max_len, device, backend, threads, spin, config)


def free_memory(mv: ModelVersion, device: str, backend: str | None) -> Callable[[], int] | None:
    """A function giving the bytes free on ``device`` now, where the runtime can tell, or None.

    Only the torch runtime on CUDA can: its factory loads the weights first, so by the time
    this is called the free memory is what they leave.
    """
    if not (device.startswith("cuda") and serves_with_torch(mv, backend)):
        return None
    from engine.runtime import torch_runner

    return lambda: torch_runner.free_device_memory(torch_runner.resolve_device(device))


def kv_budget(
    config: EngineConfig, spec: KVCacheSpec, max_len: int, free: Callable[[], int] | None
) -> int:
    """KV bytes: ``kv_cache_bytes``, a fraction of free device memory, or max_num_seqs sequences."""
    fraction = config.gpu_memory_utilization
    if fraction is None:
        return config.kv_cache_bytes or default_kv_cache_bytes(spec, max_len, config.max_num_seqs)
    if config.kv_cache_bytes is not None:
        raise KVCacheConfigError("give --kv-cache-bytes or --gpu-memory-utilization, not both")
    if not 0 < fraction <= 1:
        raise KVCacheConfigError(
            f"--gpu-memory-utilization is a fraction in (0, 1], not {fraction}"
        )
    if free is None:
        raise KVCacheConfigError(
            "--gpu-memory-utilization sizes the KV cache from free GPU memory, which only the "
            "torch runtime on CUDA measures (--format torch, --device cuda); use --kv-cache-bytes"
        )
    available = free()
    budget, per_seq = int(fraction * available), spec.bytes_per_token * max_len
    if budget < per_seq:
        raise KVCacheConfigError(
            f"--gpu-memory-utilization {fraction} of the {available / 2**20:,.0f} MiB free holds "
            f"no sequence of max_model_len tokens ({per_seq / 2**20:,.1f} MiB); raise it"
        )
    return budget


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
) -> RunnerFactory:
    """The KV shape of the ``kv_inplace`` graph and a factory of its :class:`ModelRunner`."""
    serving = mv.serving
    graph = InplaceGraph.from_manifest(mv.graph(INPLACE_VARIANT))
    wanted = _DTYPE_ALIASES.get(config.dtype, config.dtype)
    if wanted is not None and wanted != np.dtype(graph.dtype).name:
        raise BackendUnavailableError(
            f"{mv.name} v{mv.version} is a {np.dtype(graph.dtype).name} ONNX export: --dtype "
            f"{config.dtype} applies to torch-format versions (ONNX: export with or without --fp16)"
        )
    itemsize = np.dtype(graph.dtype).itemsize
    spec = KVCacheSpec(len(graph.kv) // 2, graph.num_heads, graph.head_dim, itemsize)

    def make(num_slots: int, num_blocks: int) -> ModelRunner:
        options = BackendOptions(device=device, intra_op_threads=threads, spin=spin)
        return ModelRunner(
            mv.load(INPLACE_VARIANT, options, backend),
            graph,
            num_slots,
            num_blocks,
            max_len,
            int(serving["vocab_size"]),
            int(serving.get("pad_token_id", 0)),
            config.io_binding,
        )

    return RunnerFactory(spec, graph.block_size, make)


def _torch_runner(
    mv: ModelVersion, max_len: int, device: str, threads: int | None, config: EngineConfig
) -> RunnerFactory:
    """The KV shape in the chosen dtype and a factory of the :class:`TorchRunner`.

    The weights are loaded here, before the pool is sized, so that the free device memory a
    ``gpu_memory_utilization`` budget is taken from is what they leave (:func:`free_memory`).
    Its cache is one static row of the whole context per slot (CUDA graphs need fixed
    addresses), so KV blocks only count memory there; prefixes are not cached.
    """
    from engine.runtime import torch_runner  # the only import of torch on the serving side

    module = torch_runner.TorchRunner.load_module(mv, device, config.dtype, threads)

    def make(num_slots: int, num_blocks: int) -> Any:
        return torch_runner.TorchRunner.from_version(
            mv, num_slots, max_len, cuda_graphs=config.cuda_graphs, module=module
        )

    spec = torch_runner.kv_spec(mv.serving, module[2])
    return RunnerFactory(spec, TORCH_BLOCK_SIZE, make, paged=False)
