"""The KServe v2 ``inference.GRPCInferenceService`` servicer, as tritonclient expects it.

Each task has a tensor signature (declared as data below, reported by ModelMetadata):

- generate: ``text_input`` BYTES [-1] prompts, sampling parameters as request parameters ->
  ``text_output`` BYTES, ``finish_reason`` BYTES, ``prompt_tokens`` / ``completion_tokens``
  INT64; ModelStreamInfer also sends ``token_ids`` INT64, one response per chunk.
- classify: ``text`` BYTES [-1] -> ``label`` BYTES, ``label_id`` INT64, ``probabilities`` FP32.
- sample_images: ``digit`` INT64 (or INT32) [-1], parameter ``seed`` -> ``image`` FP32.

On the stream, as in Triton's decoupled models, every response has the parameter
``triton_final_response``; with ``triton_enable_empty_final_response`` the last one is empty.
A failed request on the stream answers with ``error_message`` and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import grpc

from engine import __version__
from engine.proto import grpc_predict_v2_pb2 as pb
from engine.proto import grpc_predict_v2_pb2_grpc
from engine.server import logs
from engine.server.codecs import Outputs, TensorSig, codec_for
from engine.server.errors import ServingError, invalid, not_found, status_of
from engine.server.lifecycle import load_config
from engine.server.models import ModelCard, ServedModel
from engine.server.serving import Call, Serving, check_parsed
from engine.server.statistics import VersionStats, triton_stats
from engine.server.tensors import add_output
from engine.server.triton_config import model_config

SERVER_NAME = "engine"
FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
_STREAM_QUEUE = 64  # responses buffered per stream before producers wait for the client


def signature(card: ModelCard) -> tuple[tuple[TensorSig, ...], tuple[TensorSig, ...]]:
    """(inputs, outputs) of ``card``'s task on the KServe protocol."""
    codec = codec_for(card)
    return codec.inputs(card), codec.outputs(card)


class KServeService(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
    """ServerLive/Ready, ModelReady, metadata, ModelInfer and ModelStreamInfer."""

    def __init__(self, serving: Serving, manager: Any = None):
        self.serving = serving
        self.manager = manager  # engine.server.lifecycle.ModelManager: repository control
        self.draining = False  # set at shutdown: ServerReady turns false for load balancers

    # -- health and metadata ------------------------------------------------------------------
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The process answers."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Ready unless shutting down."""
        return pb.ServerReadyResponse(ready=not self.draining)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Ready if the model (and version, when given) is served and the server is not draining."""
        async with self.serving.rpc("ModelReady", context):
            check_parsed(request, self.serving.limits)
            try:
                self.serving.models.get(request.name, request.version)
            except ServingError:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=not self.draining)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Name, version and protocol extensions."""
        return pb.ServerMetadataResponse(
            name=SERVER_NAME,
            version=__version__,
            extensions=["parameters", "streaming", "model_configuration", "statistics"]
            + (["model_repository"] if self.manager is not None else []),
        )

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The model's versions, platform and tensor signature."""
        async with self.serving.rpc("ModelMetadata", context) as call:
            check_parsed(request, self.serving.limits)
            card = self.serving.model(call, request.name, request.version).card
            inputs, outputs = signature(card)
            loaded = sorted(self.serving.models.versions(card.name)) or [card.version]
            response = pb.ModelMetadataResponse(
                name=card.name, versions=[str(v) for v in loaded], platform=card.platform
            )
            for sig in inputs:
                response.inputs.add(name=sig.name, datatype=sig.datatype, shape=sig.shape)
            for sig in outputs:
                response.outputs.add(name=sig.name, datatype=sig.datatype, shape=sig.shape)
            return response

    # -- Triton's model management ---------------------------------------------------------------
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Triton's ModelConfig of a served model, derived from its manifest and codec."""
        async with self.serving.rpc("ModelConfig", context) as call:
            check_parsed(request, self.serving.limits)
            model = self.serving.model(call, request.name, request.version)
            policy = self.manager.policy_of(model.card.name) if self.manager else None
            return pb.ModelConfigResponse(config=model_config(model.card, policy))

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Cumulative statistics of every loaded version of one model, or of every model."""
        async with self.serving.rpc("ModelStatistics", context):
            check_parsed(request, self.serving.limits)
            models = self.serving.models
            if request.name:
                models.get(request.name, request.version)  # NOT_FOUND / UNAVAILABLE as statuses
            response = pb.ModelStatisticsResponse()
            for name in [request.name] if request.name else models.names():
                for version, model in sorted(models.versions(name).items()):
                    if request.version and request.version != str(version):
                        continue
                    counted = self.serving.stats.get(id(model)) or VersionStats()
                    stats = triton_stats(pb, name, version, counted, model.stats())
                    response.model_stats.append(stats)
            return response

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Every model version of the repository with its state (READY, UNAVAILABLE, ...)."""
        async with self.serving.rpc("RepositoryIndex", context):
            check_parsed(request, self.serving.limits)
            manager = self._manager(request.repository_name)
            response = pb.RepositoryIndexResponse()
            for name, version, state, reason in manager.index(request.ready):
                response.models.add(name=name, version=version, state=state, reason=reason)
            return response

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Load or reload a model (its ``config`` parameter may carry a version_policy)."""
        async with self.serving.rpc("RepositoryModelLoad", context) as call:
            check_parsed(request, self.serving.limits)
            manager = self._manager(request.repository_name)
            call.fields["load"] = request.model_name
            policy = load_config(request.parameters)
            if not request.model_name:
                raise invalid("name the model to load (model_name)")
            await manager.load(request.model_name, policy)
            return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Stop serving a model; its in-flight requests finish first, then its memory is freed."""
        async with self.serving.rpc("RepositoryModelUnload", context) as call:
            check_parsed(request, self.serving.limits)
            manager = self._manager(request.repository_name)
            call.fields["unload"] = request.model_name
            await manager.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

    def _manager(self, repository_name: str) -> Any:
        if self.manager is None:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server was started without a model repository to control",
            )
        if repository_name and repository_name not in (
            self.manager.repo.name,
            str(self.manager.repo),
        ):
            raise not_found(
                f"no repository {repository_name!r}; this server serves {self.manager.repo} "
                "(leave repository_name empty)"
            )
        return self.manager

    # -- inference -------------------------------------------------------------------------------
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Run one request to completion (a batch of prompts for a generate model)."""
        async with self.serving.rpc("ModelInfer", context) as call:
            check_parsed(request, self.serving.limits)
            call.request_id = self._request_id(request, context)
            model = self.serving.model(call, request.model_name, request.model_version)
            return await self._infer(call, model, request)

    async def _infer(self, call: Call, model: ServedModel, request: Any) -> Any:
        result = await codec_for(model.card).infer(self.serving, call, model, request)
        response = self._response(request, model.card)
        self._write_outputs(request, model.card, response, result.outputs)
        _set_parameters(response, result.parameters)
        return response

    async def ModelStreamInfer(self, request_iterator: Any, context: grpc.aio.ServicerContext):
        """Serve the requests of one bidirectional stream concurrently, responses as they come."""
        out: asyncio.Queue[Any] = asyncio.Queue(maxsize=_STREAM_QUEUE)
        tasks: set[asyncio.Task] = set()

        # A client that sends without reading must not grow the task set without bound: past
        # this many open requests, stop reading and let gRPC flow control push back.
        limits = self.serving.limits
        max_open = limits.max_running + limits.max_waiting

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    while len(tasks) >= max_open:
                        await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
                    task = asyncio.create_task(self._stream_one(request, out, context))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:  # the client closed its side: finish what it asked for
                    await asyncio.wait(set(tasks))
            finally:
                await out.put(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (message := await out.get()) is not None:
                await context.write(message)
            await reader  # re-raises a failure of the request side
        finally:
            for task in (reader, *tasks):
                task.cancel()  # the client left: abort every generation of the stream
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def _stream_one(self, request: Any, out: asyncio.Queue, context: Any) -> None:
        """Answer one request of a stream; failures become an error_message response."""
        call = Call(method="ModelStreamInfer", request_id=uuid.uuid4().hex)
        try:
            check_parsed(request, self.serving.limits)
            call.request_id = self._request_id(request, context)
            model = self.serving.model(call, request.model_name, request.model_version)
            empty_final = _flag(request, EMPTY_FINAL)

            async def send(outputs: Outputs, parameters: dict[str, Any], done: bool) -> None:
                response = self._response(request, model.card)
                self._write_outputs(request, model.card, response, outputs)
                _set_parameters(response, parameters)
                await self._emit(
                    out, response, final=done and not empty_final, empty_final=done and empty_final
                )

            await codec_for(model.card).stream(self.serving, call, model, request, send)
        except asyncio.CancelledError:
            call.status = "CANCELLED"
            raise
        except Exception as exc:
            code, detail = status_of(exc)
            call.status = code.name
            if code == grpc.StatusCode.INTERNAL:
                logs.log(
                    "internal error",
                    logging.ERROR,
                    exc_info=True,
                    request_id=call.request_id,
                    method=call.method,
                    model=call.model,
                )
            # The id (when the request parsed) lets a client match the error to its request.
            echo = pb.ModelInferResponse(id=getattr(request, "id", ""), model_name=call.model)
            await out.put(
                pb.ModelStreamInferResponse(
                    error_message=f"[{code.name}] {detail}", infer_response=echo
                )
            )
        finally:
            self.serving.finish(call)
            self.serving.metrics.requests.labels(call.model, call.method, call.status).inc()

    async def _emit(self, out: asyncio.Queue, response: Any, final: bool, empty_final: bool):
        response.parameters[FINAL].bool_param = final
        await out.put(pb.ModelStreamInferResponse(infer_response=response))
        if empty_final:
            last = pb.ModelInferResponse(
                model_name=response.model_name, model_version=response.model_version, id=response.id
            )
            last.parameters[FINAL].bool_param = True
            await out.put(pb.ModelStreamInferResponse(infer_response=last))

    # -- helpers ---------------------------------------------------------------------------------
    def _request_id(self, request: Any, context: grpc.aio.ServicerContext) -> str:
        try:
            return self.serving.request_id(context, request.id)
        except ServingError:
            return uuid.uuid4().hex  # KServe ids are free-form; they are echoed, not logged

    @staticmethod
    def _response(request: Any, card: ModelCard) -> Any:
        return pb.ModelInferResponse(
            model_name=card.name, model_version=str(card.version), id=request.id
        )

    @staticmethod
    def _write_outputs(request: Any, card: ModelCard, response: Any, outputs: dict) -> None:
        wanted = [o.name for o in request.outputs]
        declared = [sig.name for sig in signature(card)[1]]
        for name in wanted:
            if name not in declared:
                raise invalid(
                    f"model {card.name!r} has no output {name!r}; outputs: {', '.join(declared)}"
                )
        for name, (datatype, array) in outputs.items():
            if not wanted or name in wanted:
                add_output(response, name, datatype, array)


def _flag(request: Any, name: str) -> bool:
    param = request.parameters.get(name)
    return bool(
        param is not None
        and param.WhichOneof("parameter_choice") == "bool_param"
        and param.bool_param
    )


def _set_parameters(response: Any, parameters: dict[str, Any]) -> None:
    for name, value in parameters.items():
        if isinstance(value, bool):
            response.parameters[name].bool_param = value
        elif isinstance(value, int):
            response.parameters[name].uint64_param = value
        else:
            response.parameters[name].string_param = str(value)
