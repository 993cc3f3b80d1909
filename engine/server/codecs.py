"""Per-task KServe codecs: a task's tensor signature and how its requests become responses.

The servicer looks a model's codec up by task (:data:`CODECS`) and never branches on the task
itself, so a new task is one new codec. Each codec declares its inputs and outputs as data
(ModelMetadata and ModelConfig report them) and turns a ``ModelInferRequest`` into output
arrays through :class:`~engine.server.serving.Serving`.

generate   today's interface: ``text_input`` BYTES [N], sampling values as request parameters,
           completion only. Triton's LLM-backend interface (vLLM, TensorRT-LLM): the same
           ``text_input`` plus optional ``stream`` BOOL, ``sampling_parameters`` BYTES (JSON) and
           ``exclude_input_in_output`` BOOL; ``text_output`` then starts with the prompt unless
           excluded, as in Triton's vLLM backend (a streamed response carries only new text).
classify   ``text`` BYTES [N] (or the model's tensor input, e.g. ``pixels`` FP32 [N, 1, 8, 8])
           -> ``label``, ``label_id``, ``probabilities``.
sample_images  ``digit`` INT64/INT32 [N], parameter ``seed`` -> ``image`` FP32 [N, C, H, W].
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.server import params as sampling
from engine.server.errors import invalid
from engine.server.models import Chunk, ModelCard, ServedModel
from engine.server.tensors import DTYPES

MAX_SEED = 2**63 - 1
Outputs = dict[str, tuple[str, np.ndarray]]
# send(outputs, response parameters, done): emit one response of a stream
Send = Callable[[Outputs, dict[str, Any], bool], Awaitable[None]]


@dataclass(frozen=True)
class TensorSig:
    """One input or output a task's KServe signature declares."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    accepts: tuple[str, ...] = ()  # input datatypes taken besides ``datatype``
    optional: bool = False  # an input the request may leave out


@dataclass
class Result:
    """What one request produced: output arrays and response parameters."""

    outputs: Outputs
    parameters: dict[str, Any]


def take_inputs(request: Any, card: ModelCard, sigs: tuple[TensorSig, ...]) -> dict[str, Any]:
    """The request's inputs by name, checked against ``sigs`` (names, datatypes, shapes).

    A 1-D input also takes [N, 1] (a batch of single elements, as Triton clients often send);
    an input with more axes must match every fixed axis of its declared shape.
    """
    from engine.server.tensors import decode_inputs

    inputs = decode_inputs(request)
    wanted = ", ".join(f"{s.name!r} ({s.datatype}, shape {list(s.shape)})" for s in sigs)
    by_name = {s.name: s for s in sigs}
    unknown = [name for name in inputs if name not in by_name]
    if unknown:
        raise invalid(f"model {card.name!r} has no input {unknown[0]!r}; it takes {wanted}")
    out = {}
    for sig in sigs:
        if sig.name not in inputs:
            if sig.optional:
                continue
            raise invalid(f"input {sig.name!r} is missing; model {card.name!r} takes {wanted}")
        datatype, array = inputs[sig.name]
        if datatype != sig.datatype and datatype not in sig.accepts:
            raise invalid(
                f"input {sig.name!r} is {datatype}; model {card.name!r} takes {sig.datatype}"
            )
        if len(sig.shape) == 1:
            if array.ndim == 2 and array.shape[1] == 1:
                array = array[:, 0]
            if array.ndim != 1:
                raise invalid(
                    f"input {sig.name!r} has shape {list(array.shape)}; expected [N] or [N, 1]"
                )
        elif array.ndim != len(sig.shape) or any(
            d != -1 and d != a for d, a in zip(sig.shape, array.shape)
        ):
            raise invalid(
                f"input {sig.name!r} has shape {list(array.shape)}; model {card.name!r} takes "
                f"{list(sig.shape)} (-1: any size)"
            )
        out[sig.name] = array
    return out


def texts(array: np.ndarray, name: str) -> list[str]:
    """BYTES elements as UTF-8 strings; INVALID_ARGUMENT naming the first that is not."""
    out = []
    for i, item in enumerate(array):
        try:
            out.append(item.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise invalid(f"input {name!r} element {i} is not UTF-8 text: {exc}") from None
    return out


def _flag(inputs: dict[str, Any], name: str, default: bool) -> bool:
    if name not in inputs:
        return default
    values = inputs[name]
    if len(values) != 1:
        raise invalid(f"input {name!r} takes one BOOL, got {len(values)}")
    return bool(values[0])


def _own_parameters(request: Any) -> list[str]:
    return [
        n
        for n in request.parameters
        if not n.startswith("triton_") and n not in sampling.IGNORED_KSERVE
    ]


class Codec:
    """A task's KServe signature and request handling; subclasses implement ``infer``."""

    task = ""
    decoupled = False  # Triton's model_transaction_policy: responses stream on ModelStreamInfer

    def inputs(self, card: ModelCard) -> tuple[TensorSig, ...]:
        """The inputs a request may send."""
        raise NotImplementedError

    def outputs(self, card: ModelCard) -> tuple[TensorSig, ...]:
        """The outputs a response may carry."""
        raise NotImplementedError

    async def infer(self, serving: Any, call: Any, model: ServedModel, request: Any) -> Result:
        """Run one request to completion."""
        raise NotImplementedError

    async def stream(
        self, serving: Any, call: Any, model: ServedModel, request: Any, send: Send
    ) -> None:
        """Answer one request of ModelStreamInfer; one-shot tasks send one final response."""
        result = await self.infer(serving, call, model, request)
        await send(result.outputs, result.parameters, True)


class GenerateCodec(Codec):
    """Text generation: today's interface and Triton's LLM-backend tensors."""

    task = "generate"
    decoupled = True
    TRITON_INPUTS = ("stream", "sampling_parameters", "exclude_input_in_output")

    def inputs(self, card: ModelCard) -> tuple[TensorSig, ...]:
        """``text_input`` and Triton's optional LLM inputs."""
        return (
            TensorSig("text_input", "BYTES", (-1,)),
            TensorSig("stream", "BOOL", (1,), optional=True),
            TensorSig("sampling_parameters", "BYTES", (1,), optional=True),
            TensorSig("exclude_input_in_output", "BOOL", (1,), optional=True),
        )

    def outputs(self, card: ModelCard) -> tuple[TensorSig, ...]:
        """Text, token ids (streamed), finish reason and token counts."""
        return (
            TensorSig("text_output", "BYTES", (-1,)),
            TensorSig("token_ids", "INT64", (-1,)),
            TensorSig("finish_reason", "BYTES", (-1,)),
            TensorSig("prompt_tokens", "INT64", (-1,)),
            TensorSig("completion_tokens", "INT64", (-1,)),
        )

    def _parse(self, request: Any, card: ModelCard) -> tuple[list[str], Any, dict[str, Any]]:
        inputs = take_inputs(request, card, self.inputs(card))
        prompts = texts(inputs["text_input"], "text_input")
        if "sampling_parameters" in inputs:
            if _own_parameters(request):
                raise invalid(
                    "give sampling values either in 'sampling_parameters' or as request "
                    f"parameters, not both (got parameters {_own_parameters(request)})"
                )
            (raw,) = texts(inputs["sampling_parameters"], "sampling_parameters") or [""]
            params = sampling_from_json(raw, card.vocab_size)
        else:
            params = sampling.from_kserve(request.parameters, card.vocab_size)
        return prompts, params, inputs

    async def infer(self, serving: Any, call: Any, model: ServedModel, request: Any) -> Result:
        """Complete every prompt of the batch concurrently."""
        prompts, params, inputs = self._parse(request, model.card)
        if _flag(inputs, "stream", False):
            raise invalid("stream=true needs ModelStreamInfer: this model streams there")
        triton_form = any(name in inputs for name in self.TRITON_INPUTS)
        exclude = _flag(inputs, "exclude_input_in_output", not triton_form)
        serving.check_batch("text_input", len(prompts))
        results = await _all(_complete(serving, call, model, p, params) for p in prompts)
        text = [("" if exclude else p) + r[0] for p, r in zip(prompts, results)]
        return Result(
            {
                "text_output": ("BYTES", np.array([t.encode() for t in text], dtype=object)),
                "finish_reason": ("BYTES", np.array([r[1].encode() for r in results], object)),
                "prompt_tokens": ("INT64", np.array([r[2] for r in results], np.int64)),
                "completion_tokens": ("INT64", np.array([r[3] for r in results], np.int64)),
            },
            {},
        )

    async def stream(
        self, serving: Any, call: Any, model: ServedModel, request: Any, send: Send
    ) -> None:
        """One response per chunk (``stream`` true or absent), else one with the whole text."""
        prompts, params, inputs = self._parse(request, model.card)
        if len(prompts) != 1:
            raise invalid(
                f"a streamed request takes one prompt (text_input shape [1]), got "
                f"{len(prompts)}; send one request per prompt on the stream"
            )
        if not _flag(inputs, "stream", True):  # Triton's LLM interface with stream=false
            result = await self.infer(serving, call, model, request)
            await send(result.outputs, {}, True)
            return
        async with aclosing(serving.generate(call, model, prompts[0], params)) as chunks:
            async for chunk in chunks:
                done = chunk.finish_reason is not None
                outputs: Outputs = {
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
                await send(outputs, {}, done)


class ClassifyCodec(Codec):
    """Classification of texts, or of a tensor input the model names (``pixels``)."""

    task = "classify"

    def inputs(self, card: ModelCard) -> tuple[TensorSig, ...]:
        """``text`` BYTES [N], or the model's tensor input."""
        if card.input_name in ("", "text"):
            return (TensorSig("text", "BYTES", (-1,)),)
        return (TensorSig(card.input_name, card.input_datatype, (-1, *card.input_shape)),)

    def outputs(self, card: ModelCard) -> tuple[TensorSig, ...]:
        """The best label, its index and every label's probability."""
        return (
            TensorSig("label", "BYTES", (-1,)),
            TensorSig("label_id", "INT64", (-1,)),
            TensorSig("probabilities", "FP32", (-1, len(card.labels))),
        )

    async def infer(self, serving: Any, call: Any, model: ServedModel, request: Any) -> Result:
        """Probabilities for every row."""
        card = model.card
        names = _own_parameters(request)
        if names:
            raise invalid(f"unknown parameter {names[0]!r}: a classify model takes none")
        (sig,) = self.inputs(card)
        array = take_inputs(request, card, (sig,))[sig.name]
        if sig.name == "text":
            probs = await serving.classify(model, texts(array, "text"))
        else:
            probs = await serving.classify_tensor(model, array.astype(DTYPES[sig.datatype]))
        best = probs.argmax(axis=1)
        labels = np.array([card.labels[i].encode() for i in best], dtype=object)
        return Result(
            {
                "label": ("BYTES", labels),
                "label_id": ("INT64", best.astype(np.int64)),
                "probabilities": ("FP32", probs.astype(np.float32)),
            },
            {},
        )


class SampleImagesCodec(Codec):
    """Conditional image generation: one image per digit."""

    task = "sample_images"

    def inputs(self, card: ModelCard) -> tuple[TensorSig, ...]:
        """``digit`` INT64 (or INT32) [N]."""
        return (TensorSig("digit", "INT64", (-1,), accepts=("INT32",)),)

    def outputs(self, card: ModelCard) -> tuple[TensorSig, ...]:
        """``image`` FP32 [N, C, H, W]."""
        return (TensorSig("image", "FP32", (-1, *card.image_shape)),)

    async def infer(self, serving: Any, call: Any, model: ServedModel, request: Any) -> Result:
        """Images for the digits, under the request's (or a fresh) seed."""
        seed = _seed(request)
        digits = take_inputs(request, model.card, self.inputs(model.card))["digit"]
        images = await serving.sample_images(model, [int(d) for d in digits], seed)
        return Result({"image": ("FP32", images.astype(np.float32))}, {"seed": seed})


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


CODECS: dict[str, Codec] = {
    codec.task: codec for codec in (GenerateCodec(), ClassifyCodec(), SampleImagesCodec())
}


def codec_for(card: ModelCard) -> Codec:
    """The codec of ``card``'s task."""
    return CODECS[card.task]


# -- sampling_parameters (Triton's LLM backends send JSON, values often as strings) ------------
_FLOATS = {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"}
_FLOATS |= {"frequency_penalty"}
_INTS = {"top_k", "max_tokens", "seed", "logprobs"}


def sampling_from_json(raw: str, vocab_size: int | None) -> Any:
    """SamplingParams from a ``sampling_parameters`` JSON object (numbers or numeric strings)."""
    try:
        given = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        raise invalid(f"sampling_parameters is not JSON: {exc}") from None
    if not isinstance(given, dict):
        raise invalid("sampling_parameters must be a JSON object")
    values: dict[str, Any] = {}
    for key, value in given.items():
        try:
            if key in _FLOATS:
                values[key] = float(value)
            elif key in _INTS:
                number = float(value)
                if not number.is_integer():
                    raise ValueError(f"{value!r} is not an integer")
                values[key] = int(number)
            elif key == "ignore_eos":
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    value = value.lower() == "true"
                if not isinstance(value, bool):
                    raise ValueError(f"{value!r} is not a bool")
                values[key] = value
            elif key == "stop":
                items = [value] if isinstance(value, str) else value
                if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
                    raise ValueError("it must be a string or a list of strings")
                values[key] = tuple(items)
            elif key == "stop_token_ids":
                if not isinstance(value, list) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in value
                ):
                    raise ValueError("it must be a list of integers")
                values[key] = tuple(value)
            else:
                known = ", ".join(
                    sorted(_FLOATS | _INTS | {"ignore_eos", "stop", "stop_token_ids"})
                )
                raise invalid(f"unknown sampling parameter {key!r}; known: {known}")
        except (TypeError, ValueError) as exc:
            raise invalid(f"sampling_parameters {key!r}: {exc}") from None
    return sampling.build(values, vocab_size)


async def _complete(serving: Any, call: Any, model: ServedModel, prompt: str, params: Any):
    parts: list[str] = []
    last = Chunk("", [])
    async with aclosing(serving.generate(call, model, prompt, params)) as chunks:
        async for last in chunks:
            parts.append(last.text)
    return (
        "".join(parts),
        last.finish_reason or "abort",
        last.prompt_tokens,
        last.completion_tokens,
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
