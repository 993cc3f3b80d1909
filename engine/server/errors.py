"""Turn failures into gRPC statuses: one code per thing a caller can act on, never a traceback."""

from __future__ import annotations

import grpc

from engine.errors import EngineError


class ServingError(EngineError):
    """A request the server refuses, with the gRPC status code and a detail a person can act on."""

    def __init__(self, code: grpc.StatusCode, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def invalid(detail: str) -> ServingError:
    """INVALID_ARGUMENT: the request itself is wrong; the detail says which field and why."""
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, detail)


def not_found(detail: str) -> ServingError:
    """NOT_FOUND: an unknown model or version."""
    return ServingError(grpc.StatusCode.NOT_FOUND, detail)


def overloaded(detail: str) -> ServingError:
    """RESOURCE_EXHAUSTED: the admission queue is full; retry later or elsewhere."""
    return ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, detail)


def unavailable(detail: str) -> ServingError:
    """UNAVAILABLE: the server is shutting down or the model is not ready."""
    return ServingError(grpc.StatusCode.UNAVAILABLE, detail)


# Runtime errors by class name, so this module needs no runtime import (and no import order).
_RUNTIME_CODES = {
    "InvalidSamplingParamsError": grpc.StatusCode.INVALID_ARGUMENT,
    "RequestTooLongError": grpc.StatusCode.INVALID_ARGUMENT,
    "ModelSignatureError": grpc.StatusCode.FAILED_PRECONDITION,
    "UnknownRequestError": grpc.StatusCode.NOT_FOUND,
    "BackendUnavailableError": grpc.StatusCode.UNAVAILABLE,
    "RepositoryIntegrityError": grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and detail a failure becomes at the edge (INTERNAL for anything unexpected)."""
    if isinstance(exc, ServingError):
        return exc.code, exc.detail
    for cls in type(exc).__mro__:
        if cls.__name__ in _RUNTIME_CODES:
            return _RUNTIME_CODES[cls.__name__], str(exc)
    if isinstance(exc, EngineError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error; the server log has the details"
