"""Open a model version from a repository: verify its files, read its manifest, load a graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.repository import Manifest, RepositoryError, list_models, verify_files, version_dir
from engine.runtime.backends import (
    Backend,
    BackendOptions,
    choose_backend,
    get_backend_factory,
)
from engine.runtime.errors import BackendUnavailableError, ModelSignatureError


@dataclass
class ModelVersion:
    """One verified version directory and its manifest."""

    path: Path
    manifest: Manifest
    name: str = ""
    version: int = 0
    backends: list[Backend] = field(default_factory=list)  # loaded graphs, closed together

    @property
    def task(self) -> str:
        """``generate``, ``classify`` or ``sample_images``."""
        return self.manifest.task

    @property
    def serving(self) -> dict[str, Any]:
        """The architecture's serving metadata (context length, labels, latent size...)."""
        return self.manifest.serving

    def graph(self, variant: str) -> dict[str, Any]:
        """The manifest entry of one exported graph; a clear error if it was not exported."""
        try:
            return self.manifest.graph(variant)
        except RepositoryError as exc:
            raise ModelSignatureError(f"{self.path}: {exc}") from None

    def load(self, variant: str, options: BackendOptions, backend: str | None = None) -> Backend:
        """Load ``variant``'s graph with ``backend`` (default: by device); close() frees it."""
        plan = self._plan_file(variant)
        name = backend or choose_backend(options.device, plan is not None)
        factory = get_backend_factory(name)
        reason = factory.unavailable_reason(options.device)
        if reason:
            raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}")
        if factory.suffix == ".plan":
            if plan is None:
                raise BackendUnavailableError(
                    f"{self.path} has no TensorRT engine for {variant!r}; export with "
                    "--format tensorrt, or use the onnxruntime backend"
                )
            path = self.path / plan
        else:
            path = self.path / self.graph(variant)["file"]
        loaded = factory.load(path, options)
        self.backends.append(loaded)
        return loaded

    def _plan_file(self, variant: str) -> str | None:
        engines = (self.manifest.sections.get("tensorrt") or {}).get("engines", {})
        return engines.get(variant, {}).get("file")

    def close(self) -> None:
        """Release every loaded graph."""
        for b in self.backends:
            b.close()
        self.backends.clear()


def open_version(
    repo: Path | str, model: str | None = None, version: int | None = None
) -> ModelVersion:
    """Find ``repo/model/<version>`` (default: latest) and check every file's sha256.

    ``model`` may be left out when the repository holds exactly one model. Raises the
    repository's errors (unknown model or version, a file missing or altered), all
    :class:`~engine.errors.EngineError`s with a message that says what to do.
    """
    if model is None:
        models = list(list_models(Path(repo)))
        if len(models) != 1:
            raise ModelSignatureError(
                f"{repo} holds {len(models)} models ({', '.join(models) or 'none'}); name one"
            )
        model = models[0]
    path = version_dir(Path(repo), model, version)
    manifest = verify_files(path)
    return ModelVersion(path, manifest, model, int(path.name))
