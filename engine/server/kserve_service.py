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
import secrets
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from engine import __version__
from engine.proto import grpc_predict_v2_pb2 as pb
from engine.proto import grpc_predict_v2_pb2_grpc
from engine.server import logs
from engine.server import params as sampling
from engine.server.errors import ServingError, invalid, status_of
from engine.server.models import Chunk, ModelCard, ServedModel
from engine.server.serving import Call, Serving, check_parsed
from engine.server.tensors import add_output, decode_inputs

SERVER_NAME = "engine"
FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
MAX_SEED = 2**63 - 1
_STREAM_QUEUE = 64  # responses buffered per stream before producers wait for the client


@dataclass(frozen=True)
class TensorSig:
    """One input or output a task's KServe signature declares."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    accepts: tuple[str, ...] = ()  # input datatypes taken besides ``datatype``


def signature(card: ModelCard) -> tuple[tuple[TensorSig, ...], tuple[TensorSig, ...]]:
    """(inputs, outputs) of ``card``'s task on the KServe protocol."""
    if card.task == "generate":
        return (TensorSig("text_input", "BYTES", (-1,)),), (
            TensorSig("text_output", "BYTES", (-1,)),
            TensorSig("token_ids", "INT64", (-1,)),
            TensorSig("finish_reason", "BYTES", (-1,)),
            TensorSig("prompt_tokens", "INT64", (-1,)),
            TensorSig("completion_tokens", "INT64", (-1,)),
        )
    if card.task == "classify":
        return (TensorSig("text", "BYTES", (-1,)),), (
            TensorSig("label", "BYTES", (-1,)),
            TensorSig("label_id", "INT64", (-1,)),
            TensorSig("probabilities", "FP32", (-1, len(card.labels))),
        )
    return (TensorSig("digit", "INT64", (-1,), accepts=("INT32",)),), (
        TensorSig("image", "FP32", (-1, *card.image_shape)),
    )


def _take_input(request: Any, card: ModelCard) -> np.ndarray:
    """The task's one input as a flat array, after checking names, datatype and shape."""
    (sig,), _ = signature(card)
    inputs = decode_inputs(request)
    wanted = f"{sig.name!r} ({sig.datatype}, shape {list(sig.shape)})"
    unknown = [name for name in inputs if name != sig.name]
    if unknown:
        raise invalid(f"model {card.name!r} has no input {unknown[0]!r}; it takes {wanted}")
    if sig.name not in inputs:
        raise invalid(f"input {sig.name!r} is missing; model {card.name!r} takes {wanted}")
    datatype, array = inputs[sig.name]
    if datatype != sig.datatype and datatype not in sig.accepts:
        raise invalid(f"input {sig.name!r} is {datatype}; model {card.name!r} takes {wanted}")
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]  # [N, 1]: a batch of single elements, as Triton clients often send
    if array.ndim != 1:
        raise invalid(f"input {sig.name!r} has shape {list(array.shape)}; expected [N] or [N, 1]")
    return array


def _texts(array: np.ndarray, name: str) -> list[str]:
    out = []
    for i, item in enumerate(array):
        try:
            out.append(item.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise invalid(f"input {name!r} element {i} is not UTF-8 text: {exc}") from None
    return out


class KServeService(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
    """ServerLive/Ready, ModelReady, metadata, ModelInfer and ModelStreamInfer."""

    def __init__(self, serving: Serving):
        self.serving = serving
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
            name=SERVER_NAME, version=__version__, extensions=["parameters", "streaming"]
        )

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The model's versions, platform and tensor signature."""
        async with self.serving.rpc("ModelMetadata", context) as call:
            check_parsed(request, self.serving.limits)
            card = self.serving.model(call, request.name, request.version).card
            inputs, outputs = signature(card)
            response = pb.ModelMetadataResponse(
                name=card.name, versions=[str(card.version)], platform=card.platform
            )
            for sig in inputs:
                response.inputs.add(name=sig.name, datatype=sig.datatype, shape=sig.shape)
            for sig in outputs:
                response.outputs.add(name=sig.name, datatype=sig.datatype, shape=sig.shape)
            return response

    # -- inference -------------------------------------------------------------------------------
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Run one request to completion (a batch of prompts for a generate model)."""
        async with self.serving.rpc("ModelInfer", context) as call:
            check_parsed(request, self.serving.limits)
            call.request_id = self._request_id(request, context)
            model = self.serving.model(call, request.model_name, request.model_version)
            return await self._infer(call, model, request)

    async def _infer(self, call: Call, model: ServedModel, request: Any) -> Any:
        card = model.card
        array = _take_input(request, card)
        response = self._response(request, card)
        outputs: dict[str, tuple[str, np.ndarray]] = {}
        if card.task == "generate":
            prompts = _texts(array, "text_input")
            self.serving.check_batch("text_input", len(prompts))
            params = sampling.from_kserve(request.parameters, card.vocab_size)
            results = await _all(self._complete(call, model, p, params) for p in prompts)
            outputs["text_output"] = ("BYTES", np.array([r[0].encode() for r in results], object))
            outputs["finish_reason"] = ("BYTES", np.array([r[1].encode() for r in results], object))
            outputs["prompt_tokens"] = ("INT64", np.array([r[2] for r in results], np.int64))
            outputs["completion_tokens"] = ("INT64", np.array([r[3] for r in results], np.int64))
        elif card.task == "classify":
            self._no_parameters(request)
            probs = await self.serving.classify(model, _texts(array, "text"))
            best = probs.argmax(axis=1)
            labels = np.array([card.labels[i].encode() for i in best], dtype=object)
            outputs["label"] = ("BYTES", labels)
            outputs["label_id"] = ("INT64", best.astype(np.int64))
            outputs["probabilities"] = ("FP32", probs.astype(np.float32))
        else:
            seed = self._seed(request)
            images = await self.serving.sample_images(model, [int(d) for d in array], seed)
            outputs["image"] = ("FP32", images.astype(np.float32))
            response.parameters["seed"].uint64_param = seed
        self._write_outputs(request, card, response, outputs)
        return response

    async def _complete(self, call: Call, model: ServedModel, prompt: str, params: Any):
        parts: list[str] = []
        last = Chunk("", [])
        async with aclosing(self.serving.generate(call, model, prompt, params)) as chunks:
            async for last in chunks:
                parts.append(last.text)
        return (
            "".join(parts),
            last.finish_reason or "abort",
            last.prompt_tokens,
            last.completion_tokens,
        )

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
            if model.card.task != "generate":
                response = await self._infer(call, model, request)
                await self._emit(out, response, final=not empty_final, empty_final=empty_final)
            else:
                await self._stream_generate(call, model, request, out, empty_final)
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
            self.serving.metrics.requests.labels(call.model, call.method, call.status).inc()

    async def _stream_generate(
        self, call: Call, model: ServedModel, request: Any, out: asyncio.Queue, empty_final: bool
    ) -> None:
        card = model.card
        prompts = _texts(_take_input(request, card), "text_input")
        if len(prompts) != 1:
            raise invalid(
                f"a streamed request takes one prompt (text_input shape [1]), got "
                f"{len(prompts)}; send one request per prompt on the stream"
            )
        params = sampling.from_kserve(request.parameters, card.vocab_size)
        async with aclosing(self.serving.generate(call, model, prompts[0], params)) as chunks:
            async for chunk in chunks:
                done = chunk.finish_reason is not None
                response = self._response(request, card)
                outputs = {
                    "text_output": ("BYTES", np.array([chunk.text.encode()], dtype=object)),
                    "token_ids": ("INT64", np.array(chunk.token_ids, dtype=np.int64)),
                }
                if done:
                    outputs["finish_reason"] = (
                        "BYTES",
                        np.array([chunk.finish_reason.encode()], dtype=object),
                    )
                    outputs["prompt_tokens"] = ("INT64", np.array([chunk.prompt_tokens]))
                    outputs["completion_tokens"] = ("INT64", np.array([chunk.completion_tokens]))
                self._write_outputs(request, card, response, outputs)
                await self._emit(
                    out, response, final=done and not empty_final, empty_final=done and empty_final
                )

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

    @staticmethod
    def _no_parameters(request: Any) -> None:
        for name in request.parameters:
            if not name.startswith("triton_") and name not in sampling.IGNORED_KSERVE:
                raise invalid(f"unknown parameter {name!r}: a classify model takes none")

    @staticmethod
    def _seed(request: Any) -> int:
        for name, param in request.parameters.items():
            if name.startswith("triton_") or name in sampling.IGNORED_KSERVE:
                continue
            if name != "seed":
                raise invalid(f"unknown parameter {name!r}: an image model takes only 'seed'")
            kind = param.WhichOneof("parameter_choice")
            if kind not in ("int64_param", "uint64_param") or getattr(param, kind) < 0:
                raise invalid("parameter 'seed' must be a non-negative integer")
            return int(getattr(param, kind))
        return secrets.randbelow(MAX_SEED)


def _flag(request: Any, name: str) -> bool:
    param = request.parameters.get(name)
    return bool(
        param is not None
        and param.WhichOneof("parameter_choice") == "bool_param"
        and param.bool_param
    )


async def _all(coros: Any) -> list[Any]:
    """Await every coroutine concurrently; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
