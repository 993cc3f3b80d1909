"""Bearer-token authentication as a server interceptor; health checks stay open.

With a token configured, every call except ``grpc.health.v1.Health`` must carry the metadata
``authorization: Bearer <token>``; otherwise it ends UNAUTHENTICATED before reaching a servicer.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without ``authorization: Bearer <token>`` (compared in constant time)."""

    def __init__(self, token: str, open_prefixes: tuple[str, ...] = OPEN_PREFIXES):
        if not token:
            raise ValueError("the auth token is empty")
        self._expected = f"Bearer {token}".encode()
        self._open = open_prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass authorised (and open) calls on; answer the rest with UNAUTHENTICATED."""
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._open):
            return handler
        given = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value if isinstance(value, str) else value.decode("latin-1")
                break
        if given and hmac.compare_digest(given.encode("utf-8", "replace"), self._expected):
            return handler
        detail = (
            "missing 'authorization: Bearer <token>' metadata"
            if not given
            else "the bearer token is not valid"
        )
        return _refusal(handler, detail)


def _refusal(handler: grpc.RpcMethodHandler, detail: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call UNAUTHENTICATED."""
    code = grpc.StatusCode.UNAUTHENTICATED

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, detail)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, detail)

    kwargs = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
