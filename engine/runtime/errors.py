"""Runtime failures a user can act on; each becomes a CLI message or a gRPC status at the edge."""

from __future__ import annotations

from engine.errors import EngineError


class InvalidSamplingParamsError(EngineError, ValueError):
    """A sampling parameter is out of range (e.g. ``top_p=1.5``); the message names it."""


class InvalidPromptError(EngineError, ValueError):
    """A prompt is empty, holds token ids outside the vocabulary, or reuses a live request id."""


class RequestTooLongError(InvalidPromptError):
    """A prompt cannot fit the model's context (with room for one generated token)."""


class UnknownRequestError(EngineError, KeyError):
    """A request id is not known to the engine (never added, or already finished)."""


class RepositoryIntegrityError(EngineError):
    """A model repository file is missing or its sha256 does not match the manifest."""


class BackendUnavailableError(EngineError):
    """The requested backend or device cannot run here (e.g. TensorRT without a GPU)."""


class ModelSignatureError(EngineError):
    """An exported graph's inputs/outputs do not match what the runtime needs for its task."""
