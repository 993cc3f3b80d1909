"""Scale-out on Ray Serve: N runtime replicas behind Ray Serve's gRPC ingress.

``engine serve --ray --replicas N`` starts (or joins) a Ray cluster, starts Serve's gRPC proxy
with this engine's two services registered (Serve's constraint: the proxy imports the
generated ``add_*Servicer_to_server`` functions by path and routes each RPC by its method name
to the deployment's method of that name), and deploys :class:`EngineReplica` N times. Each
replica loads the repository like ``engine serve`` does and answers through the same
servicers (``EngineService``, ``KServeService``), so both protocols behave as on one process;
Serve spreads requests over the replicas and restarts one that dies.

Each response carries the trailing metadata ``x-engine-replica: <replica id>/<pid>``, so a
client (and the tests) can see which replica answered. Not routed through the ingress: gRPC
health (Serve's proxy answers its own ``ray.serve.RayServeAPIService/Healthz``) and
repository control (a load reaches one replica; redeploy to change every replica's models).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from engine.extras import needs
from engine.proto import POOL, engine_pb2, grpc_predict_v2_pb2

APP_NAME = "engine"
REPLICA_HEADER = "x-engine-replica"
SERVICERS = [
    "engine.proto.engine_pb2_grpc.add_EngineServiceServicer_to_server",
    "engine.proto.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server",
]
SERVICES = {
    "engine.v1.EngineService": engine_pb2,
    "inference.GRPCInferenceService": grpc_predict_v2_pb2,
}


class _Aborted(grpc.aio.AbortError):
    """Raised by :meth:`_RayContext.abort`; the status is already on Ray's context."""


class _RayContext:
    """The servicer context our servicers use, over Ray Serve's gRPC context."""

    def __init__(self, ray_context: Any, tag: str):
        self.ray = ray_context
        self.tag = tag
        self.out: asyncio.Queue | None = None  # streamed responses (context.write)
        self._trailer: list[tuple[str, str]] = [(REPLICA_HEADER, tag)]
        self.ray.set_trailing_metadata(self._trailer)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        self.ray.set_code(code)
        self.ray.set_details(details)
        self.set_trailing_metadata(trailing_metadata)
        raise _Aborted()

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.ray.set_trailing_metadata([*self._trailer, *metadata])

    def invocation_metadata(self) -> Any:
        return self.ray.invocation_metadata()

    def time_remaining(self) -> float | None:
        return None  # the proxy enforces its own request_timeout_s

    async def write(self, message: Any) -> None:
        await self.out.put(message)


_DONE = object()


def _response_class(service: str, method: str) -> Any:
    descriptor = POOL.FindServiceByName(service).methods_by_name[method]
    return getattr(SERVICES[service], descriptor.output_type.name)


def _unary(service: str, method: str):
    empty = _response_class(service, method)

    async def call(self, request: Any, grpc_context: Any = None) -> Any:
        context = await self._context(grpc_context)
        try:
            return await getattr(self._servicer(service), method)(request, context)
        except _Aborted:
            return empty()

    call.__name__ = method
    return call


def _streaming(service: str, method: str):
    async def call(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        context = await self._context(grpc_context)
        context.out = asyncio.Queue(maxsize=64)
        handler = getattr(self._servicer(service), method)

        async def run() -> None:
            try:
                await handler(request, context)
            except _Aborted:
                pass
            finally:
                await context.out.put(_DONE)

        task = asyncio.create_task(run())
        try:
            while (message := await context.out.get()) is not _DONE:
                yield message
            await task
        finally:
            task.cancel()

    call.__name__ = method
    return call


class EngineReplica:
    """One replica: the repository's models behind both servicers, as in ``engine serve``."""

    def __init__(self, repo: str, names: list[str] | None, policy: str, engine_kwargs: dict):
        self.repo, self.names, self.policy = Path(repo), names, policy
        self.engine_kwargs = engine_kwargs
        self._services: dict[str, Any] = {}
        self._lock: asyncio.Lock | None = None
        self.tag = ""

    async def _start(self) -> None:
        from engine.server.engine_service import EngineService
        from engine.server.kserve_service import KServeService
        from engine.server.lifecycle import ModelManager, VersionPolicy
        from engine.server.loader import open_served
        from engine.server.metrics import ServerMetrics
        from engine.server.serving import Serving

        def opener(repo: Path, name: str, version: int):
            return open_served(repo, name, version, **self.engine_kwargs)

        manager = ModelManager(self.repo, opener, VersionPolicy.parse(self.policy))
        await manager.load_all(self.names)
        serving = Serving(manager.models, ServerMetrics())
        manager.serving = serving
        self._services = {
            "engine.v1.EngineService": EngineService(serving),
            "inference.GRPCInferenceService": KServeService(serving, manager),
        }
        try:
            from ray import serve

            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Ray (tests of the adapter)
            replica = "local"
        self.tag = f"{replica}/{os.getpid()}"

    async def _context(self, grpc_context: Any) -> _RayContext:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if not self._services:
                await self._start()
        return _RayContext(grpc_context, self.tag)

    def _servicer(self, service: str) -> Any:
        return self._services[service]

    async def check_health(self) -> None:
        """Ray's health check: the models loaded (lazily, on the first call or here)."""
        await self._context(_NullContext())


class _NullContext:
    def set_trailing_metadata(self, metadata: Any) -> None:
        pass


for _service, _module in SERVICES.items():
    for _method in POOL.FindServiceByName(_service).methods:
        make = _streaming if _method.server_streaming else _unary
        setattr(EngineReplica, _method.name, make(_service, _method.name))


def serve_on_ray(
    repo: Path,
    replicas: int,
    port: int,
    names: list[str] | None,
    policy: str,
    engine_kwargs: dict,
    address: str | None = None,
    ready_file: Path | None = None,
) -> None:
    """Deploy ``replicas`` replicas behind Serve's gRPC proxy on ``port``; run until SIGTERM."""
    with needs("ray", "`engine serve --ray`"):
        import ray
        from ray import serve
        from ray.serve.config import gRPCOptions

    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": 0},
            grpc_options=gRPCOptions(port=port, grpc_servicer_functions=SERVICERS),
        )
        deployment = serve.deployment(
            EngineReplica,
            name="EngineReplica",
            num_replicas=replicas,
            ray_actor_options={"num_cpus": 0},  # replicas share the cores; onnxruntime threads
            health_check_period_s=2,
        )
        kwargs = dict(engine_kwargs)
        app = deployment.bind(str(repo), names, policy, kwargs)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)  # None: not on the proxy
        if ready_file is not None:
            ready_file.write_text(str(port))
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        try:
            while not stop["now"]:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    finally:
        serve.shutdown()
        ray.shutdown()
