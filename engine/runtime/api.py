"""One entry point: open a model version and get the engine for its task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.runtime.backends import BackendOptions
from engine.runtime.batched_engines import ClassifierEngine, ImageEngine, TensorClassifierEngine
from engine.runtime.batcher import BatcherConfig
from engine.runtime.errors import ModelSignatureError
from engine.runtime.llm_engine import EngineConfig, LLMEngine
from engine.runtime.loader import open_version
from engine.serving_contract import check_serving, classify_input

AnyEngine = LLMEngine | ClassifierEngine | TensorClassifierEngine | ImageEngine


class Engine:
    """Namespace for :meth:`from_repository`, the way the CLI and the server load a model."""

    @staticmethod
    def from_repository(
        repo: Path | str,
        model: str | None = None,
        version: int | None = None,
        *,
        device: str = "cpu",
        backend: str | None = None,
        threads: int | None = None,
        config: EngineConfig | None = None,
        batcher: BatcherConfig | None = None,
        spin: bool = True,
    ) -> AnyEngine:
        """Verify ``repo/model/version`` (default: latest) and build the engine for its task.

        ``model`` may be omitted when the repository holds a single model.

        ``generate`` gives an :class:`LLMEngine` (``async for out in engine.generate(...)``),
        ``classify`` a :class:`ClassifierEngine` (``await engine.classify(texts)``),
        ``sample_images`` an :class:`ImageEngine` (``await engine.sample_images(digits)``).
        """
        mv = open_version(repo, model, version)
        check_serving(mv.manifest, f"model {mv.name!r} version {mv.version}", mv.path)
        if mv.task == "generate":
            return LLMEngine.from_version(
                mv, device=device, backend=backend, threads=threads, config=config, spin=spin
            )
        options = BackendOptions(device=device, intra_op_threads=threads, spin=spin)
        engines: dict[str, Any] = {"classify": ClassifierEngine, "sample_images": ImageEngine}
        if mv.task == "classify" and classify_input(mv.serving) != "text":
            engines["classify"] = TensorClassifierEngine
        if mv.task not in engines:
            raise ModelSignatureError(f"model {mv.name!r} has task {mv.task!r}: nothing serves it")
        graph = mv.load(mv.manifest.main_graph or "default", options, backend)
        return engines[mv.task](mv, graph, batcher)
