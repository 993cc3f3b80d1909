"""Load a model repository's models with the runtime and present them as ServedModels.

One adapter per task wraps the runtime engine (``engine.runtime.Engine.from_repository``):
generation streams ``RequestOutput`` deltas as :class:`Chunk`s, classification returns the
full probability matrix in label order, image sampling returns (N, C, H, W) arrays. Nothing
here imports torch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EngineError
from engine.server.errors import invalid
from engine.server.models import Chunk, ModelCard, ModelStats


def _batching(engine: Any) -> dict[str, Any]:
    """The card fields of a dynamic batcher's configuration."""
    config = engine.batcher.config
    return {
        "max_batch_size": int(config.max_batch_size),
        "max_queue_delay_us": int(config.max_queue_delay_ms * 1000),
        "preferred_batch_sizes": tuple(config.preferred_batch_sizes),
    }


_DATATYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64"}
_DATATYPES |= {"int32": "INT32", "uint8": "UINT8", "bool": "BOOL"}


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
        device=getattr(engine, "device", "cpu") or "cpu",
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
            kv_blocks_cached=kv.cached_blocks,
            prefix_queries=kv.prefix_queries,
            prefix_hits=kv.prefix_hits,
            preemptions=kv.preemptions,
        )

    async def close(self) -> None:
        """Release the graph."""
        self.engine.close()


class Classifier:
    """A runtime ``ClassifierEngine`` as a ServedModel."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.card = _card(
            engine, labels=tuple(engine.labels), input_name="text", **_batching(engine)
        )
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
        batcher = self.engine.batcher
        return ModelStats(batch_sizes=dict(batcher.batch_sizes), batch_ns=dict(batcher.batch_ns))

    async def close(self) -> None:
        """Release the graph."""
        self.engine.close()


class TensorClassifier:
    """A runtime ``TensorClassifierEngine`` (pixels in, probabilities out) as a ServedModel."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.card = _card(
            engine,
            labels=tuple(engine.labels),
            input_name=engine.input_name,
            input_datatype=_DATATYPES.get(engine.input_dtype.name, "FP32"),
            input_shape=tuple(d if isinstance(d, int) else -1 for d in engine.input_shape),
            **_batching(engine),
        )

    async def classify(self, texts: list[str]) -> np.ndarray:
        """Refused: this model takes a tensor, which engine.v1 Classify cannot carry."""
        raise invalid(
            f"model {self.card.name!r} classifies {self.card.input_name!r} tensors, not texts; "
            f"send {self.card.input_name!r} over KServe ModelInfer"
        )

    def tokenize(self, text: str) -> list[int]:
        """Refused: no tokenizer."""
        raise invalid(f"model {self.card.name!r} has no tokenizer: it takes tensors")

    async def classify_tensor(self, rows: np.ndarray) -> np.ndarray:
        """Probabilities (N, labels) in label order."""
        return (await self.engine.classify_tensor(rows)).astype(np.float32)

    def stats(self) -> ModelStats:
        """Batch sizes of the dynamic batcher."""
        batcher = self.engine.batcher
        return ModelStats(batch_sizes=dict(batcher.batch_sizes), batch_ns=dict(batcher.batch_ns))

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
            **_batching(engine),
        )

    async def sample_images(self, digits: list[int], seed: int) -> np.ndarray:
        """One image per digit, (N, C, H, W)."""
        images = await self.engine.sample_images(digits, n=1, seed=seed)
        return images.reshape(len(digits), *self.card.image_shape)

    def stats(self) -> ModelStats:
        """Batch sizes of the dynamic batcher."""
        batcher = self.engine.batcher
        return ModelStats(batch_sizes=dict(batcher.batch_sizes), batch_ns=dict(batcher.batch_ns))

    async def close(self) -> None:
        """Release the graph."""
        self.engine.close()


ADAPTERS = {"generate": LanguageModel, "classify": Classifier, "sample_images": ImageGenerator}


class ModelLoadError(EngineError):
    """A model version could not be loaded; the message names it and says why."""


def open_served(repo: Path, name: str, version: int, device: str = "cpu", **engine_kwargs: Any):
    """Load ``repo/name/version`` with the runtime and wrap it for serving (blocking).

    The runtime checks the files against their manifest hashes and the manifest against the
    serving contract of its task first. Any failure becomes one :class:`ModelLoadError` line.
    """
    from engine.extras import EXTRAS, missing_extra
    from engine.runtime import Engine

    where = f"model {name!r} version {version}"
    engine = None
    try:
        engine = Engine.from_repository(repo, name, version, device=device, **engine_kwargs)
        task = engine.model.task
        if task not in ADAPTERS:
            raise ModelLoadError(f"{where} has task {task!r}, which this server cannot serve")
        if hasattr(engine, "classify_tensor"):
            return TensorClassifier(engine)
        return ADAPTERS[task](engine)
    except ModelLoadError:
        raise
    except ModuleNotFoundError as exc:  # a torch-format version on the serving install
        if engine is not None:
            engine.close()
        root = (exc.name or "").split(".")[0]
        if root in EXTRAS["train"]:
            raise missing_extra(f"serving {where}", "train", root) from None
        raise ModelLoadError(f"{where} cannot be served: {exc}") from None
    except EngineError as exc:
        if engine is not None:
            engine.close()
        raise ModelLoadError(f"{where} cannot be served: {exc}") from None
    except Exception as exc:  # a broken file or manifest must not stop the other models
        if engine is not None:
            engine.close()
        raise ModelLoadError(f"{where} cannot be served: {type(exc).__name__}: {exc}") from None
