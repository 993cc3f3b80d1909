"""The engine.v1.EngineService servicer: protobuf in, :class:`Serving` calls, protobuf out."""

from __future__ import annotations

import json
import secrets
from contextlib import aclosing
from typing import Any

import grpc

from engine.proto import engine_pb2 as pb
from engine.proto import engine_pb2_grpc
from engine.server import params as sampling
from engine.server.errors import invalid
from engine.server.models import Chunk, ModelCard
from engine.server.png import encode_png
from engine.server.serving import Serving, check_parsed

_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
MAX_SEED = 2**63 - 1  # what a random draw uses; requests may send any uint64


def summary(card: ModelCard, ready: bool = True) -> pb.ModelSummary:
    """A ModelSummary message for ``card``."""
    return pb.ModelSummary(
        name=card.name,
        version=str(card.version),
        task=card.task,
        architecture=card.architecture,
        ready=ready,
    )


def chunk_message(request_id: str, chunk: Chunk) -> pb.GenerateResponse:
    """One GenerateResponse; the last chunk carries finish reason and usage."""
    msg = pb.GenerateResponse(
        request_id=request_id,
        text=chunk.text,
        token_ids=chunk.token_ids,
        finish_reason=_FINISH.get(chunk.finish_reason, 0),
    )
    for lp in chunk.logprobs or ():
        entry = msg.logprobs.add(token_id=lp.token_id, logprob=lp.logprob)
        for token_id, logprob in lp.top:
            entry.top.add(token_id=token_id, logprob=logprob)
    if chunk.finish_reason is not None:
        msg.usage.prompt_tokens = chunk.prompt_tokens
        msg.usage.completion_tokens = chunk.completion_tokens
        msg.usage.total_tokens = chunk.prompt_tokens + chunk.completion_tokens
    return msg


class EngineService(engine_pb2_grpc.EngineServiceServicer):
    """Generate, Classify, SampleImages, ListModels, ModelInfo and Tokenize."""

    def __init__(self, serving: Serving):
        self.serving = serving

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        """Stream a completion, one message per chunk (context.write keeps cancel handling ours)."""
        async with self.serving.rpc("Generate", context) as call:
            check_parsed(request, self.serving.limits)
            call.request_id = self.serving.request_id(context, request.request_id)
            model = self.serving.model(call, request.model, request.version, "generate")
            params = sampling.from_proto(request.params, model.card.vocab_size)
            stream = self.serving.generate(call, model, request.prompt, params)
            async with aclosing(stream) as chunks:
                async for chunk in chunks:
                    await context.write(chunk_message(call.request_id, chunk))

    async def Classify(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Label and class probabilities for each text."""
        async with self.serving.rpc("Classify", context) as call:
            check_parsed(request, self.serving.limits)
            call.request_id = self.serving.request_id(context)
            model = self.serving.model(call, request.model, request.version, "classify")
            probs = await self.serving.classify(model, list(request.texts))
            labels = model.card.labels
            response = pb.ClassifyResponse(labels=labels)
            for row, best in zip(probs, probs.argmax(axis=1)):
                response.results.add(
                    label=labels[best], label_id=int(best), probabilities=row.tolist()
                )
            return response

    async def SampleImages(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """One image per digit, as PNG and as raw floats."""
        async with self.serving.rpc("SampleImages", context) as call:
            check_parsed(request, self.serving.limits)
            call.request_id = self.serving.request_id(context)
            model = self.serving.model(call, request.model, request.version, "sample_images")
            seed = request.seed if request.HasField("seed") else secrets.randbelow(MAX_SEED)
            digits = list(request.digits)
            images = await self.serving.sample_images(model, digits, seed)
            low, high = model.card.pixel_range
            response = pb.SampleImagesResponse(
                shape=images.shape[1:], pixel_range=(low, high), seed=seed
            )
            for digit, image in zip(digits, images):
                response.images.add(
                    digit=digit, png=encode_png(image, low, high), pixels=image.reshape(-1).tolist()
                )
            return response

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Every served model."""
        async with self.serving.rpc("ListModels", context) as call:
            check_parsed(request, self.serving.limits)
            call.request_id = self.serving.request_id(context)
            return pb.ListModelsResponse(models=[summary(m.card) for m in self.serving.models])

    async def ModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """One model's manifest and calling facts."""
        async with self.serving.rpc("ModelInfo", context) as call:
            check_parsed(request, self.serving.limits)
            call.request_id = self.serving.request_id(context)
            card = self.serving.model(call, request.model, request.version).card
            return pb.ModelInfoResponse(
                model=summary(card),
                manifest_json=json.dumps(
                    card.manifest.to_dict() if card.manifest else {}, sort_keys=True
                ),
                context_length=card.context_length,
                vocab_size=card.vocab_size,
                labels=card.labels,
                image_shape=card.image_shape,
                num_classes=card.num_classes,
            )

    async def Tokenize(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Token ids (and their text pieces) of a text under a model's tokenizer."""
        async with self.serving.rpc("Tokenize", context) as call:
            check_parsed(request, self.serving.limits)
            call.request_id = self.serving.request_id(context)
            model = self.serving.model(call, request.model, request.version)
            if model.card.task not in ("generate", "classify"):
                raise invalid(f"model {model.card.name!r} ({model.card.task}) has no tokenizer")
            if len(request.text) > self.serving.limits.max_prompt_chars:
                raise invalid(
                    f"text is {len(request.text)} characters; the limit is "
                    f"{self.serving.limits.max_prompt_chars}"
                )
            ids = model.tokenize(request.text)
            return pb.TokenizeResponse(token_ids=ids, tokens=model.token_strings(ids))
