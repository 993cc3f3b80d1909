"""KServe v2 tensors <-> numpy: typed contents, raw little-endian bytes and length-prefixed BYTES.

Decoding validates as it goes (datatype known, shape non-negative, element count matching the
shape, raw and typed contents not mixed) and raises INVALID_ARGUMENT naming the tensor.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from engine.server.errors import invalid

# KServe datatype -> numpy dtype (little-endian; BYTES are numpy object arrays of bytes).
DTYPES: dict[str, Any] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
# Which InferTensorContents field holds each datatype (FP16/BF16 only travel raw).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def serialize_bytes(values: np.ndarray) -> bytes:
    """Flatten a BYTES tensor into the raw form: each element a uint32 LE length, then bytes."""
    parts = []
    for item in values.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(raw: bytes, count: int, name: str) -> np.ndarray:
    """Split a raw BYTES tensor into ``count`` elements; INVALID_ARGUMENT if it is malformed."""
    if count * 4 > len(raw):  # checked before allocating: a shape may claim anything
        raise invalid(f"input {name!r}: {len(raw)} raw bytes cannot hold {count} BYTES elements")
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise invalid(f"input {name!r}: raw BYTES content ends before element {i} of {count}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise invalid(f"input {name!r}: element {i} claims {length} bytes past the content")
        out[i] = raw[offset : offset + length]
        offset += length
    if offset != len(raw):
        raise invalid(f"input {name!r}: {len(raw) - offset} bytes left after {count} elements")
    return out


def decode_inputs(request: Any) -> dict[str, tuple[str, np.ndarray]]:
    """Map each input name of a ModelInferRequest to (datatype, array in its shape)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise invalid(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, in order, or use typed contents"
        )
    out: dict[str, tuple[str, np.ndarray]] = {}
    for i, tensor in enumerate(request.inputs):
        name, datatype = tensor.name, tensor.datatype
        if name in out:
            raise invalid(f"input {name!r} is given twice")
        if datatype not in DTYPES:
            raise invalid(
                f"input {name!r}: unknown datatype {datatype!r}; "
                f"KServe datatypes are {', '.join(DTYPES)}"
            )
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            raise invalid(f"input {name!r}: shape {shape} has a negative dimension")
        count = math.prod(shape)
        if raw:
            if tensor.HasField("contents"):
                raise invalid(f"input {name!r} has typed contents and raw_input_contents; use one")
            array = _from_raw(raw[i], datatype, count, name)
        else:
            array = _from_contents(tensor, datatype, count, name)
        try:
            out[name] = (datatype, array.reshape(shape))
        except ValueError:  # e.g. [0, 2**40, 2**40]: no elements, but too big for numpy
            raise invalid(f"input {name!r}: shape {shape} is too large to represent") from None
    return out


def _from_raw(data: bytes, datatype: str, count: int, name: str) -> np.ndarray:
    if datatype == "BYTES":
        return deserialize_bytes(data, count, name)
    dtype = DTYPES[datatype]
    if len(data) != count * dtype.itemsize:
        raise invalid(
            f"input {name!r}: raw content is {len(data)} bytes; shape and {datatype} need "
            f"{count} x {dtype.itemsize} = {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype)


def _from_contents(tensor: Any, datatype: str, count: int, name: str) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise invalid(f"input {name!r}: {datatype} tensors must be sent as raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise invalid(
            f"input {name!r}: {len(values)} elements in contents.{field}, but shape "
            f"{list(tensor.shape)} needs {count}"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out
    return np.asarray(values, dtype=DTYPES[datatype])


def add_output(response: Any, name: str, datatype: str, array: np.ndarray) -> None:
    """Append ``array`` as output ``name`` in raw form (what Triton and tritonclient use)."""
    tensor = response.outputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(int(d) for d in array.shape)
    if datatype == "BYTES":
        response.raw_output_contents.append(serialize_bytes(array))
    else:
        data = np.ascontiguousarray(array, dtype=DTYPES[datatype])
        response.raw_output_contents.append(data.tobytes())
