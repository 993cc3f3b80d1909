"""Facts about the engine.v1 wire that its client and its server share, read from the proto.

One definition: the proto's own descriptor says which sampling fields are optional scalars, so
adding a field to ``SamplingParams`` in ``engine.proto`` reaches both sides at once.
"""

from __future__ import annotations

from engine.proto import engine_pb2 as pb


def optional_scalars(message: type) -> tuple[str, ...]:
    """Names of a message's ``optional`` scalar fields (unset means the receiver's default)."""
    fields = message.DESCRIPTOR.fields
    return tuple(f.name for f in fields if f.has_presence and f.message_type is None)


# temperature, top_k, top_p, min_p, the three penalties, max_tokens, seed, logprobs
SAMPLING_SCALAR_FIELDS = optional_scalars(pb.SamplingParams)
