"""Triton's ModelConfig for a served model, from its card (manifest) and its task's codec.

Conventions as in Triton: with ``max_batch_size`` > 0 (a dynamic batcher), ``dims`` leave out
the batch axis; a generate model has ``max_batch_size`` 0 (its requests are scheduled by the
engine, not batched by the server) and a decoupled transaction policy (it streams). Datatypes
map BYTES to TYPE_STRING.
"""

from __future__ import annotations

from typing import Any

from engine.proto import model_config_pb2 as mc
from engine.server.codecs import codec_for
from engine.server.models import ModelCard

BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}


def data_type(datatype: str) -> int:
    """Triton's DataType enum value of a KServe datatype."""
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def _dims(shape: tuple[int, ...], batched: bool) -> list[int]:
    dims = list(shape[1:]) if batched else list(shape)
    return dims or [1]


def model_config(card: ModelCard, policy: Any = None) -> Any:
    """The ``inference.ModelConfig`` message of ``card`` (``policy``: a VersionPolicy or None)."""
    codec = codec_for(card)
    batched = card.max_batch_size > 0
    config = mc.ModelConfig(
        name=card.name,
        platform=card.platform,
        backend=BACKENDS.get(card.platform, "python"),
        max_batch_size=card.max_batch_size,
        runtime="engine",
    )
    if policy is not None and policy.all:
        config.version_policy.all.SetInParent()
    elif policy is not None and policy.specific:
        config.version_policy.specific.versions.extend(policy.specific)
    else:
        config.version_policy.latest.num_versions = policy.latest if policy is not None else 1
    for sig in codec.inputs(card):
        config.input.add(
            name=sig.name,
            data_type=data_type(sig.datatype),
            dims=_dims(sig.shape, batched),
            optional=sig.optional,
        )
    for sig in codec.outputs(card):
        config.output.add(
            name=sig.name, data_type=data_type(sig.datatype), dims=_dims(sig.shape, batched)
        )
    if batched:
        config.dynamic_batching.max_queue_delay_microseconds = card.max_queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(card.preferred_batch_sizes)
    config.model_transaction_policy.decoupled = codec.decoupled
    kind = (
        mc.ModelInstanceGroup.KIND_GPU
        if card.device.startswith("cuda")
        else mc.ModelInstanceGroup.KIND_CPU
    )
    config.instance_group.add(name=card.name, count=1, kind=kind)
    for key in ("context_length", "vocab_size"):
        if getattr(card, key):
            config.parameters[key].string_value = str(getattr(card, key))
    if card.labels:
        config.parameters["labels"].string_value = ",".join(card.labels)
    return config
