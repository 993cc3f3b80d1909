"""Assemble and run the gRPC server: services, health, reflection, auth, TLS, metrics, shutdown.

:class:`EngineServer` is the async object (tests start several on free ports); ``serve`` in
``engine.server.cli_commands`` wraps it for the command line. On SIGTERM (or SIGINT) the server
reports NOT_SERVING, answers new calls UNAVAILABLE (clients retry elsewhere), lets in-flight
ones finish for ``grace`` seconds, ends the rest with UNAVAILABLE (their generations are
aborted) and returns, so the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool

from engine.errors import EngineError
from engine.proto import POOL, engine_pb2, engine_pb2_grpc, grpc_predict_v2_pb2, model_config_pb2
from engine.proto import grpc_predict_v2_pb2_grpc as kserve_grpc
from engine.server import logs
from engine.server.auth import BearerTokenInterceptor
from engine.server.engine_service import EngineService
from engine.server.kserve_service import KServeService
from engine.server.lifecycle import ModelManager
from engine.server.metrics import ServerMetrics
from engine.server.models import ModelSet, ServedModel
from engine.server.serving import Limits, Serving, safe_deserializer

ENGINE_SERVICE = "engine.v1.EngineService"
KSERVE_SERVICE = "inference.GRPCInferenceService"
_PENDING_CALLS = 8192  # grpc core's backlog of calls not yet taken in (see start)
_SEND_LIMIT = 64 << 20  # images of a large batch; responses are ours, so a generous cap

# Health checking and reflection are extras a server can run without (a bare GPU host may lack
# their packages): the server starts and says in its log which one is off and why.
try:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
except ImportError as exc:
    health = health_pb2 = health_pb2_grpc = None
    _NO_HEALTH = f"{exc}; pip install grpcio-health-checking"
try:
    from grpc_reflection.v1alpha import reflection, reflection_pb2
except ImportError as exc:
    reflection = reflection_pb2 = None
    _NO_REFLECTION = f"{exc}; pip install grpcio-reflection"


class ServerStartError(EngineError):
    """The server could not bind its port or read its TLS files; the message says which."""


@dataclass
class ServerConfig:
    """Where and how the server listens; defaults suit a local run."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (tests)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9090  # None: no metrics endpoint; 0: a free port
    auth_token: str | None = None
    tls_cert: bytes | None = None  # PEM; with tls_key, the port speaks TLS only
    tls_key: bytes | None = None
    grace: float = 30.0  # seconds in-flight calls get at shutdown
    reflection: bool = True
    limits: Limits = field(default_factory=Limits)


class _CaptureHandlers:
    """Stands in for a server to receive the method handlers generated code registers."""

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def _add_service(server: grpc.aio.Server, add: Callable, servicer: Any) -> None:
    """Register ``servicer`` with deserializers that turn bad bytes into INVALID_ARGUMENT."""
    capture = _CaptureHandlers()
    add(servicer, capture)
    methods = POOL.FindServiceByName(capture.service).methods_by_name
    handlers = {
        name: h._replace(
            request_deserializer=safe_deserializer(
                h.request_deserializer, methods[name].input_type.full_name
            )
        )
        for name, h in capture.handlers.items()
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(capture.service, handlers),)
    )
    server.add_registered_method_handlers(capture.service, handlers)


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """A pool holding every served file, so reflection (grpcurl) describes all services."""
    pool = descriptor_pool.DescriptorPool()
    for module in filter(
        None, (engine_pb2, model_config_pb2, grpc_predict_v2_pb2, health_pb2, reflection_pb2)
    ):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    return pool


class EngineServer:
    """One grpc.aio server serving ``models`` over engine.v1 and KServe v2."""

    def __init__(
        self,
        models: ModelSet | Iterable[ServedModel],
        config: ServerConfig | None = None,
        metrics: ServerMetrics | None = None,
        manager: ModelManager | None = None,
    ):
        """Serve ``models``; with ``manager`` (its ModelSet), also Triton's repository control."""
        self.config = config or ServerConfig()
        if manager is not None:
            models = manager.models
        self.models = models if isinstance(models, ModelSet) else ModelSet(models)
        self.metrics = metrics or ServerMetrics()
        self.serving = Serving(self.models, self.metrics, self.config.limits)
        self.manager = manager
        if manager is not None:
            manager.serving = self.serving
            manager.on_change = self._model_changed
        self.kserve = KServeService(self.serving, manager)
        self.health = health.aio.HealthServicer() if health is not None else None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()

    def _health_names(self) -> list[str]:
        return ["", ENGINE_SERVICE, KSERVE_SERVICE, *self.models.names()]

    async def _set_health(self, status: str) -> None:
        """Report ``status`` (SERVING, NOT_SERVING) for the server and every model, if on.

        Models that failed to load (or were unloaded) stay NOT_SERVING either way.
        """
        if self.health is None:
            return
        value = health_pb2.HealthCheckResponse.ServingStatus.Value(status)
        for name in self._health_names():
            await self.health.set(name, value)
        for name in self.models.unavailable:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _model_changed(self, name: str, ready: bool) -> None:
        """A model was loaded or unloaded (or failed): its health status follows."""
        if self.health is not None and self._server is not None and not self.kserve.draining:
            status = health_pb2.HealthCheckResponse
            await self.health.set(name, status.SERVING if ready else status.NOT_SERVING)

    async def start(self) -> int:
        """Bind, register everything and start serving; return the bound port."""
        cfg = self.config
        interceptors = [BearerTokenInterceptor(cfg.auth_token)] if cfg.auth_token else []
        options = [
            # gRPC's own limit answers RESOURCE_EXHAUSTED; ours (below it) INVALID_ARGUMENT with
            # a detail, so only requests far past the limit get the terse transport error.
            ("grpc.max_receive_message_length", 4 * cfg.limits.max_message_bytes),
            ("grpc.max_send_message_length", _SEND_LIMIT),
            ("grpc.so_reuseport", 0),  # a second server on a busy port fails instead of sharing
            # Calls that arrived but that the app has not taken in yet wait in grpc core; past
            # 1000 (its default) core drops them at random as CANCELLED, which a burst of
            # streams on a fresh connection reaches. We take calls in at once and refuse past
            # our admission queue (RESOURCE_EXHAUSTED), so core's backlog is only a buffer.
            ("grpc.server.max_pending_requests", _PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", 2 * _PENDING_CALLS),
        ]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        _add_service(
            server, engine_pb2_grpc.add_EngineServiceServicer_to_server, EngineService(self.serving)
        )
        _add_service(server, kserve_grpc.add_GRPCInferenceServiceServicer_to_server, self.kserve)
        if self.health is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        else:
            logs.log("health checking off", logging.WARNING, reason=_NO_HEALTH)
        if cfg.reflection and reflection is not None:
            names = [ENGINE_SERVICE, KSERVE_SERVICE, reflection.SERVICE_NAME]
            names += [health.SERVICE_NAME] if health is not None else []
            reflection.enable_server_reflection(names, server, pool=_reflection_pool())
        elif cfg.reflection:
            logs.log("reflection off", logging.WARNING, reason=_NO_REFLECTION)
        address = f"{cfg.host}:{cfg.port}"
        try:
            if cfg.tls_cert or cfg.tls_key:
                if not (cfg.tls_cert and cfg.tls_key):
                    raise ServerStartError("TLS needs both a certificate and a key")
                creds = grpc.ssl_server_credentials([(cfg.tls_key, cfg.tls_cert)])
                self.port = server.add_secure_port(address, creds)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ServerStartError(f"cannot listen on {address}: {exc}") from None
        await self._set_health("SERVING")
        await server.start()
        self._server = server
        if cfg.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.start_http(cfg.metrics_host, cfg.metrics_port)
            except OSError as exc:
                await server.stop(0)
                raise ServerStartError(
                    f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: {exc}"
                ) from None
        logs.log(
            "server started",
            address=f"{cfg.host}:{self.port}",
            tls=bool(cfg.tls_cert),
            auth=bool(cfg.auth_token),
            metrics_port=self.metrics_port,
            models=self.models.names(),
            not_ready=sorted(self.models.unavailable),
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, wait ``grace`` s for in-flight ones, close.

        New calls get UNAVAILABLE from our handlers while the port stays open, so a call a
        client sent just before the signal is answered rather than dropped by the transport;
        calls still running at the deadline end with UNAVAILABLE too.
        """
        if self._server is None:
            return
        loop = asyncio.get_running_loop()
        grace = self.config.grace if grace is None else grace
        deadline = loop.time() + grace
        logs.log("server draining", grace_s=grace)
        self.kserve.draining = True
        await self._set_health("NOT_SERVING")
        if not await self.serving.drain(grace):
            logs.log("grace period over: ending the calls still running with UNAVAILABLE")
            await self.serving.cut()
        # What our handlers do not track (KServe streams) gets the rest of the grace period.
        await self._server.stop(max(0.0, deadline - loop.time()))
        self._server = None
        for model in self.models:
            await model.close()
        self.metrics.stop_http()
        logs.log("server stopped")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Return once :meth:`stop` has finished."""
        await self._stopped.wait()

    async def run_until_signal(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain within the grace period."""
        loop = asyncio.get_running_loop()
        received = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, received.set)
        try:
            if self._server is None:
                await self.start()
            await received.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()
