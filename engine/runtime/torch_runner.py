"""The torch runner: ``ModelRunner``'s job on PyTorch, for ``torch``-format versions on GPU hosts.

Same interface as :class:`~engine.runtime.model_runner.ModelRunner` (``execute``, ``release``,
``kv_bytes``), same sampling (:class:`SamplingState` on numpy logits; an all-greedy batch takes
its argmax on the device and only token ids cross to the host). The module is rebuilt through
the architecture plugin (:func:`engine.checkpoint.load` on the version directory) and must have
``forward_static(input_ids, position_ids, cache, cache_pos, window)`` (the decoder LM's).

Memory: one key and one value tensor of (layers, slots, heads, max_model_len + 1, head_dim) in
the chosen dtype, allocated once on the device. A request holds one slot (its KV-cache block
id). Position ``max_model_len`` is scratch: padding rows write there, where no window reaches.

Prefill runs eager: the module's ordinary forward on right-padded prompts, whose keys/values are
then written into the prompts' slots. Decode runs rows ``[0, b)`` of the pool in place, ``b``
the batch bucket (1, 2, 4, ... up to the slot count) that holds the highest scheduled slot;
the manager hands out low slot ids first, so the rows stay tight. Rows not scheduled ride
along, writing to scratch. Attention reads a window of the cache: a power of two that covers
the longest sequence. On CUDA, each (bucket, window) step is captured once as a CUDA graph over
static input buffers and replayed (one host-to-device copy of four small int rows per step);
on CPU the same step runs eager.

Importing this module imports torch: only ``LLMEngine.from_version`` does, and only for a
``torch``-format version, so the ONNX serving path stays torch-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.runtime.errors import BackendUnavailableError, ModelSignatureError
from engine.runtime.kv_cache import KVCacheSpec
from engine.runtime.model_runner import SlotRunner, pack_prompts
from engine.runtime.sampler import SamplerOutput
from engine.runtime.scheduler import SchedulerOutput

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
MIN_WINDOW = 32  # smallest attention window: fewer CUDA graphs for short sequences
_IDS, _POS, _CACHE_POS, _GATHER = range(4)  # rows of the per-step input buffer


def resolve_device(device: str) -> torch.device:
    """``cpu`` or ``cuda[:N]`` as a torch device; raise if this torch cannot use it."""
    if device == "tensorrt" or not (device == "cpu" or device.startswith("cuda")):
        raise BackendUnavailableError(
            f"the torch backend runs on cpu or cuda, not {device!r}; a TensorRT engine needs "
            "--format tensorrt"
        )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"device {device!r} needs a CUDA GPU, but torch {torch.__version__} sees none; "
            "use --device cpu"
        )
    return torch.device(device)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The KV/weights dtype; by default float16 on CUDA (tensor cores) and float32 on CPU."""
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise BackendUnavailableError(
            f"unknown dtype {name!r}; choose float32, float16 or bfloat16"
        )
    return DTYPES[name]


def kv_spec(serving: dict[str, Any], dtype: torch.dtype) -> KVCacheSpec:
    """The KV shape from a version's serving metadata, for the engine's memory budget."""
    try:
        layers, heads, dim = (int(serving[k]) for k in ("n_layer", "n_head", "head_dim"))
    except KeyError as exc:
        raise ModelSignatureError(
            f"the serving metadata lacks {exc}, which the torch runtime sizes its cache by"
        ) from None
    return KVCacheSpec(layers, heads, dim, torch.empty((), dtype=dtype).element_size())


def free_device_memory(device: torch.device) -> int:
    """Bytes free on a CUDA device now, as the driver counts them (other processes included).

    The allocator's cached blocks go back first: they are this process's, and free to use.
    """
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def batch_buckets(num_slots: int) -> list[int]:
    """Decode batch sizes a step is padded to: powers of two below ``num_slots``, then it."""
    out = [1 << i for i in range(num_slots.bit_length()) if (1 << i) < num_slots]
    return [*out, num_slots]


class TorchRunner(SlotRunner):
    """Runs scheduled requests through a torch module with a static KV cache; samples tokens."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: KVCacheSpec,
        num_slots: int,
        max_model_len: int,
        vocab_size: int,
        pad_token_id: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cuda_graphs: bool = True,
    ):
        if not callable(getattr(model, "forward_static", None)):
            raise ModelSignatureError(
                f"{type(model).__name__} has no forward_static(), which the torch runtime "
                "decodes with; export this model with --format onnx"
            )
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        self.num_slots, self.max_model_len = num_slots, max_model_len
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.buckets = batch_buckets(num_slots)
        L, H, T, D = spec.num_layers, spec.num_kv_heads, max_model_len, spec.head_dim
        # The KV pool; position T of every slot is the padding rows' scratch.
        self.k = torch.zeros((L, num_slots, H, T + 1, D), dtype=dtype, device=self.device)
        self.v = torch.zeros_like(self.k)
        self._views: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # Per-step inputs (ids, positions, cache positions, gather rows): filled on the host,
        # copied in one go into the static device buffer the CUDA graphs read.
        pin = self.device.type == "cuda"
        self._host_t = torch.zeros((4, num_slots, 1), dtype=torch.int64, pin_memory=pin)
        self._host = self._host_t.numpy()
        self._dev = self._host_t.to(self.device) if pin else self._host_t
        self._graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._arange = np.arange(T, dtype=np.int64)
        self._init_slots(num_slots, vocab_size, pad_token_id)  # per-slot decode state

    @staticmethod
    def load_module(
        mv: Any, device: str = "cpu", dtype: str | None = None, threads: int | None = None
    ) -> tuple[torch.nn.Module, torch.device, torch.dtype]:
        """Rebuild a ``torch``-format version's module on ``device`` in ``dtype``.

        Done before the KV pool is sized, so the free device memory it is sized from
        (``--gpu-memory-utilization``) is what the weights leave.
        """
        from engine import checkpoint

        dev = resolve_device(device)
        if threads and dev.type == "cpu":
            torch.set_num_threads(threads)
        torch_dtype = resolve_dtype(dtype, dev)
        _, _, model = checkpoint.load(mv.path, device=str(dev))
        return model.to(dev, torch_dtype), dev, torch_dtype

    @classmethod
    def from_version(
        cls,
        mv: Any,
        num_slots: int,
        max_model_len: int,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        threads: int | None = None,
        cuda_graphs: bool = True,
        module: tuple[torch.nn.Module, torch.device, torch.dtype] | None = None,
    ) -> TorchRunner:
        """Build the runner of a ``torch``-format version (``module``: from :meth:`load_module`)."""
        model, dev, torch_dtype = module or cls.load_module(mv, device, dtype, threads)
        serving = mv.serving
        runner = cls(
            model,
            kv_spec(serving, torch_dtype),
            num_slots,
            max_model_len,
            int(serving["vocab_size"]),
            int(serving.get("pad_token_id", 0)),
            dev,
            torch_dtype,
            cuda_graphs,
        )
        runner.capture_all()
        return runner

    @property
    def num_graphs(self) -> int:
        """Decode steps captured as CUDA graphs (0 when they are off or off CUDA)."""
        return len(self._graphs)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the preallocated KV pool (0 once closed)."""
        if self.k is None:
            return 0
        return 2 * self.k.numel() * self.k.element_size()

    @torch.no_grad()
    def execute(self, out: SchedulerOutput, slots: np.ndarray) -> SamplerOutput:
        """:meth:`SlotRunner.execute` without autograd."""
        return super().execute(out, slots)

    def _sample(self, parts: list, slots: np.ndarray) -> SamplerOutput:
        """An all-greedy batch takes its argmax on the device: only token ids cross over."""
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)  # (B, V) on the device
        if self.sampling.argmax_only[slots].all():
            ids = logits.argmax(dim=-1).cpu().numpy().astype(np.int64)
            return SamplerOutput(token_ids=ids)
        return super()._sample([logits.float().cpu().numpy()], slots)

    def _prefill(self, out: SchedulerOutput, slots: np.ndarray) -> torch.Tensor:
        """Compute whole prompts (right-padded) eagerly into their slots; return last logits."""
        requests = out.prefill
        ids, lens = pack_prompts(requests, slots, self.pad_token_id, self.sampling)
        n, S = ids.shape
        mask = (self._arange[:S][None, :] < lens[:, None]).astype(np.int64)
        to_dev = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        positions = torch.arange(S, device=self.device).expand(n, S)
        logits, present = self.model(to_dev(ids), positions, to_dev(mask))
        rows = to_dev(slots)
        for layer, (k, v) in enumerate(present):  # positions past a row's length: never read
            self.k[layer, rows, :, :S] = k
            self.v[layer, rows, :, :S] = v
        self.length[slots] = lens
        self.steps[slots] = [r.num_output_tokens for r in requests]
        return logits[torch.arange(n, device=self.device), to_dev(lens - 1)]

    def _decode(self, slots: np.ndarray) -> torch.Tensor:
        """One token for each slot, reading and writing the pool in place; logits (d, V)."""
        b = next(size for size in self.buckets if size > int(slots.max()))
        window = self._window(int(self.length[slots].max()) + 1)
        host = self._host
        host[_IDS, :b] = self.pad_token_id
        host[_POS, :b] = 0
        host[_CACHE_POS, :b] = self.max_model_len  # padding rows write to scratch
        host[_IDS, slots, 0] = self.last_token[slots]
        host[_POS, slots, 0] = self.length[slots]
        host[_CACHE_POS, slots, 0] = self.length[slots]
        host[_GATHER, : len(slots), 0] = slots
        if self._dev is not self._host_t:  # CUDA: the previous step's .cpu() has synced
            self._dev.copy_(self._host_t, non_blocking=True)
        logits = self._step(b, window)  # (b, 1, V)
        self.length[slots] += 1
        return logits[self._dev[_GATHER, : len(slots), 0], 0]

    @torch.no_grad()
    def capture_all(self) -> None:
        """Capture every (bucket, window) decode graph now, so no request waits for a capture.

        A no-op off CUDA. The captures run on padding rows only (every write goes to scratch).
        """
        if not self.use_graphs:
            return
        self._host[_IDS], self._host[_POS] = self.pad_token_id, 0
        self._host[_CACHE_POS] = self.max_model_len
        self._dev.copy_(self._host_t)
        T, w = self.max_model_len, MIN_WINDOW
        windows = []
        while w < T:
            windows.append(w)
            w *= 2
        for b in self.buckets:
            for window in [*windows, T]:
                if (b, window) not in self._graphs:
                    self._graphs[(b, window)] = self._capture(b, window)
        torch.cuda.synchronize(self.device)

    def _window(self, needed: int) -> int:
        """The attention window for ``needed`` cached positions: a power of two, capped."""
        return min(self.max_model_len, max(MIN_WINDOW, 1 << (needed - 1).bit_length()))

    def _args(self, b: int, window: int) -> tuple:
        if b not in self._views:
            self._views[b] = [(k[:b], v[:b]) for k, v in zip(self.k, self.v)]
        dev = self._dev
        return dev[_IDS, :b], dev[_POS, :b], self._views[b], dev[_CACHE_POS, :b], window

    def _step(self, b: int, window: int) -> torch.Tensor:
        """Run the decode step for bucket ``b``: eager, or a CUDA graph captured on first use."""
        if not self.use_graphs:
            return self.model.forward_static(*self._args(b, window))
        key = (b, window)
        if key not in self._graphs:
            self._graphs[key] = self._capture(b, window)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits

    def _capture(self, b: int, window: int) -> tuple[Any, torch.Tensor]:
        """Capture one decode step over the static buffers (all graphs share one memory pool).

        A warm-up run on a side stream first initialises cuBLAS and the allocator outside the
        capture; it computes this very step, so the keys it writes are the ones replay writes.
        """
        args = self._args(b, window)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.model.forward_static(*args)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.model.forward_static(*args)
        return graph, logits

    def close(self) -> None:
        """Free the KV pool, the graphs and their memory."""
        self._graphs.clear()
        self._views.clear()
        self.k = self.v = self._pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
