"""Load a model repository's models with the runtime and present them as ServedModels.

One adapter per task wraps the runtime engine (``engine.runtime.Engine.from_repository``):
generation streams ``RequestOutput`` deltas as :class:`Chunk`s, classification returns the
full probability matrix in label order, image sampling returns (N, C, H, W) arrays. Nothing
here imports torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EngineError
from engine.server.models import Chunk, ModelCard, ModelStats


def _card(engine: Any, **extra: Any) -> ModelCard:
    mv = engine.model
    manifest = mv.manifest
    platforms = {"tensorrt": "tensorrt_plan", "torch": "pytorch_libtorch"}  # Triton's names
    platform = platforms.get(manifest.format, "onnxruntime_onnx")
    return ModelCard(
        name=mv.name,
        version=mv.version,
        task=mv.task,
        architecture=manifest.architecture,
        platform=platform,
        manifest=manifest,
        **extra,
    )


class LanguageModel:
    """A runtime ``LLMEngine`` as a ServedModel."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.card = _card(
            engine, context_length=int(engine.max_model_len), vocab_size=int(engine.vocab_size)
        )

    def tokenize(self, text: str) -> list[int]:
        """Token ids under the model's tokenizer."""
        return list(self.engine.tokenizer.encode(text).ids)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Each id decoded on its own."""
        return [self.engine.tokenizer.decode([t]) for t in token_ids]

    async def generate(self, request_id: str, prompt: str, params: Any) -> AsyncIterator[Chunk]:
        """Stream the runtime's outputs as chunks."""
        async with aclosing(self.engine.generate(prompt, params, request_id)) as outputs:
            async for out in outputs:
                yield Chunk(
                    text=out.delta_text,
                    token_ids=out.delta_token_ids,
                    finish_reason=out.finish_reason if out.finished else None,
                    logprobs=out.logprobs,
                    prompt_tokens=out.usage.prompt_tokens,
                    completion_tokens=out.usage.completion_tokens,
                )

    def abort(self, request_id: str) -> None:
        """Abort in the runtime (frees the KV slot); unknown ids are ignored."""
        self.engine.abort(request_id)

    def stats(self) -> ModelStats:
        """KV blocks and the scheduler's queue."""
        kv = self.engine.kv_stats()
        scheduler = self.engine.scheduler
        return ModelStats(
            kv_blocks_used=kv.used_blocks,
            kv_blocks_free=kv.free_blocks,
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            steps=self.engine.num_steps,
        )

    async def close(self) -> None:
        """Release the graph."""
        self.engine.close()


class Classifier:
    """A runtime ``ClassifierEngine`` as a ServedModel."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.card = _card(engine, labels=tuple(engine.labels))
        self._index = {label: i for i, label in enumerate(engine.labels)}

    def tokenize(self, text: str) -> list[int]:
        """The ids the model sees: [CLS] + tokens, truncated to its length."""
        return self.engine.encode([text])["input_ids"][0].tolist()

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Each id decoded on its own."""
        return [self.engine.tokenizer.id_to_token(t) or "" for t in token_ids]

    async def classify(self, texts: list[str]) -> np.ndarray:
        """Probabilities (N, labels) in label order."""
        results = await self.engine.classify(texts, top_k=len(self._index))
        probs = np.zeros((len(results), len(self._index)), np.float32)
        for row, result in enumerate(results):
            for label, p in result.top:
                probs[row, self._index[label]] = p
        return probs

    def stats(self) -> ModelStats:
        """Batch sizes of the dynamic batcher."""
        return ModelStats(batch_sizes=dict(self.engine.batcher.batch_sizes))

    async def close(self) -> None:
        """Release the graph."""
        self.engine.close()


class ImageGenerator:
    """A runtime ``ImageEngine`` as a ServedModel."""

    def __init__(self, engine: Any):
        self.engine = engine
        serving = engine.model.serving
        low, high = engine.pixel_range
        self.card = _card(
            engine,
            image_shape=tuple(int(d) for d in serving["image_shape"]),
            num_classes=int(engine.num_classes),
            pixel_range=(float(low), float(high)),
        )

    async def sample_images(self, digits: list[int], seed: int) -> np.ndarray:
        """One image per digit, (N, C, H, W)."""
        images = await self.engine.sample_images(digits, n=1, seed=seed)
        return images.reshape(len(digits), *self.card.image_shape)

    def stats(self) -> ModelStats:
        """Batch sizes of the dynamic batcher."""
        return ModelStats(batch_sizes=dict(self.engine.batcher.batch_sizes))

    async def close(self) -> None:
        """Release the graph."""
        self.engine.close()


ADAPTERS = {"generate": LanguageModel, "classify": Classifier, "sample_images": ImageGenerator}


async def load_models(
    repo: Path, names: Sequence[str] | None = None, device: str = "cpu", **engine_kwargs: Any
) -> list[Any]:
    """Open every model of ``repo`` (or those in ``names``) at its latest version.

    Files are checked against their manifest hashes first; loading runs in a worker thread so
    a slow load does not block the event loop. ``engine_kwargs`` go to
    ``Engine.from_repository`` (backend, threads, config, batcher).
    """
    from engine.repository import list_models
    from engine.runtime import Engine

    available = list_models(repo)
    if not available:
        raise EngineError(
            f"model repository {repo} holds no models; export one with "
            "`engine export CHECKPOINT --repo DIR`"
        )
    wanted = list(names) if names else list(available)
    missing = [n for n in wanted if n not in available]
    if missing:
        raise EngineError(
            f"no model {missing[0]!r} in {repo}; models there: {', '.join(available)}"
        )
    served = []
    for name in wanted:
        engine = await asyncio.to_thread(
            Engine.from_repository, repo, name, device=device, **engine_kwargs
        )
        task = engine.model.task
        if task not in ADAPTERS:
            engine.close()
            raise EngineError(f"model {name!r} has task {task!r}, which this server cannot serve")
        served.append(ADAPTERS[task](engine))
    return served
