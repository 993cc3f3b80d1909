"""What the server needs from a loaded model, and the set of models one process serves.

The servicers speak to :class:`ServedModel` only; ``engine.server.loader`` wraps the runtime's
engines in it, and tests can pass a fake. Everything here is plain data or a protocol: no
protobuf; from the runtime only its plain output types (``TokenLogprob``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from engine.repository import Manifest
from engine.runtime.outputs import TokenLogprob
from engine.server.errors import invalid, not_found, unavailable

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class ModelCard:
    """Who a model is and what a client must know to call it (from its manifest)."""

    name: str
    version: int
    task: str  # generate, classify or sample_images
    architecture: str = ""
    platform: str = "onnxruntime_onnx"  # KServe/Triton platform name
    manifest: Manifest | None = field(default=None, hash=False, compare=False)
    context_length: int = 0  # generate: prompt plus output tokens
    vocab_size: int = 0  # generate
    labels: tuple[str, ...] = ()  # classify, in probability order
    image_shape: tuple[int, ...] = ()  # sample_images: (channels, height, width)
    num_classes: int = 0  # sample_images: digits are 0 .. num_classes - 1
    pixel_range: tuple[float, float] = (-1.0, 1.0)  # sample_images: raw pixel range
    input_name: str = ""  # classify: "text", or the graph input of a tensor classifier
    input_datatype: str = "FP32"  # classify with a tensor input: its KServe datatype
    input_shape: tuple[int, ...] = ()  # classify with a tensor input: shape after the batch
    max_batch_size: int = 0  # dynamic batching: most rows per backend call (0: none)
    max_queue_delay_us: int = 0  # dynamic batching: how long a request may wait for a batch
    preferred_batch_sizes: tuple[int, ...] = ()
    device: str = "cpu"


@dataclass
class Chunk:
    """One streamed piece of a generation; the last has ``finish_reason`` and final counts."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length" or "abort" on the last chunk
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # output tokens so far


@dataclass(frozen=True)
class ModelStats:
    """Counters for metrics: KV blocks, the runtime's queue, batches (zeros if not applicable)."""

    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    num_running: int = 0
    num_waiting: int = 0
    steps: int = 0  # generate: engine steps so far (generated tokens / steps = mean batch)
    kv_blocks_cached: int = 0  # generate: free blocks holding a cached prefix (reclaimable)
    prefix_queries: int = 0  # generate: prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # ... found there (not recomputed)
    preemptions: int = 0  # generate: requests evicted from KV memory and recomputed later
    batch_sizes: dict[int, int] = field(default_factory=dict)  # rows per backend call -> count
    batch_ns: dict[int, int] = field(default_factory=dict)  # rows per backend call -> total ns


class ServedModel(Protocol):
    """A loaded model as the servicers use it; only the methods of its task need to work."""

    card: ModelCard

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (generate and classify models)."""
        ...

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """The text piece of each token id, for Tokenize."""
        ...

    def generate(self, request_id: str, prompt: str, params: Any) -> AsyncIterator[Chunk]:
        """Stream the completion of ``prompt`` under runtime SamplingParams ``params``."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a generation and free its KV memory; a no-op for unknown or finished ids."""
        ...

    async def classify(self, texts: list[str]) -> np.ndarray:
        """Class probabilities, shape (len(texts), len(card.labels)), float32."""
        ...

    async def classify_tensor(self, rows: np.ndarray) -> np.ndarray:
        """Class probabilities of tensor rows (classify models with a tensor input)."""
        ...

    async def sample_images(self, digits: list[int], seed: int) -> np.ndarray:
        """One image per digit, shape (len(digits), *card.image_shape), float32."""
        ...

    def stats(self) -> ModelStats:
        """Current counters."""
        ...

    async def close(self) -> None:
        """Release the model's resources (background tasks, sessions)."""
        ...


class ModelSet:
    """The models one server serves: each name's loaded versions, and names that failed to load.

    A name maps to its versions as one dict that is replaced whole (:meth:`swap`), so a lookup
    sees either the old versions or the new ones, never a mix. Without a version, a lookup gets
    the newest loaded one. Lookups fail as gRPC statuses.
    """

    def __init__(
        self, models: Iterable[ServedModel] = (), unavailable: dict[str, str] | None = None
    ):
        self._versions: dict[str, dict[int, ServedModel]] = {}
        for m in models:
            self._versions.setdefault(m.card.name, {})[m.card.version] = m
        self.unavailable: dict[str, str] = dict(unavailable or {})  # name -> why it is not ready

    def __iter__(self):
        return iter([m for versions in self._versions.values() for m in versions.values()])

    def __len__(self) -> int:
        return sum(len(v) for v in self._versions.values())

    def names(self) -> list[str]:
        """Served (ready) model names, sorted."""
        return sorted(self._versions)

    def versions(self, name: str) -> dict[int, ServedModel]:
        """The loaded versions of ``name`` (empty if none)."""
        return self._versions.get(name, {})

    def latest(self, name: str) -> ServedModel | None:
        """The newest loaded version of ``name``, or None."""
        versions = self._versions.get(name)
        return versions[max(versions)] if versions else None

    def swap(self, name: str, versions: dict[int, ServedModel]) -> dict[int, ServedModel]:
        """Serve exactly ``versions`` of ``name`` from now on; return the versions replaced."""
        old = self._versions.get(name, {})
        if versions:
            self._versions[name] = dict(versions)
            self.unavailable.pop(name, None)
        else:
            self._versions.pop(name, None)
        return old

    def get(self, name: str, version: str = "", task: str | None = None) -> ServedModel:
        """The model ``name`` (at ``version`` if given, else its newest), checked to serve ``task``.

        Raises NOT_FOUND for an unknown name or version, UNAVAILABLE for a model that failed to
        load, INVALID_ARGUMENT for a task mismatch.
        """
        if not name:
            raise invalid(f"no model named in the request; models served: {self._listing()}")
        versions = self._versions.get(name)
        if not versions:
            if name in self.unavailable:
                raise unavailable(f"model {name!r} is not ready: {self.unavailable[name]}")
            raise not_found(f"model {name!r} is not served here; models: {self._listing()}")
        if version:
            model = versions.get(int(version)) if version.isdigit() else None
            if model is None:
                raise not_found(
                    f"model {name!r} has no version {version!r} here; serving version(s) "
                    f"{', '.join(map(str, sorted(versions)))} (leave the version empty for the "
                    "newest)"
                )
        else:
            model = versions[max(versions)]
        if task is not None and model.card.task != task:
            raise invalid(
                f"model {name!r} is a {model.card.task} model and cannot {task.replace('_', ' ')}"
                f"; {task} models here: {', '.join(self.names_for(task)) or '(none)'}"
            )
        return model

    def names_for(self, task: str) -> list[str]:
        """Served models of one task."""
        return [n for n in self.names() if self.latest(n).card.task == task]

    def _listing(self) -> str:
        return ", ".join(self.names()) or "(none)"
