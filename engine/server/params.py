"""Sampling parameters from the wire: engine.v1 messages and KServe request parameters.

Both end in the runtime's :class:`SamplingParams` and its ``validate``, so a bad value gets the
same INVALID_ARGUMENT detail through either protocol.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from engine.runtime.errors import InvalidSamplingParamsError
from engine.runtime.sampling_params import SamplingParams
from engine.server.errors import invalid
from engine.wire import SAMPLING_SCALAR_FIELDS as SCALAR_FIELDS  # also the KServe names

_INT_FIELDS = {"top_k", "max_tokens", "seed", "logprobs"}
# KServe parameters that tritonclient or Triton's own clients send; accepted and ignored.
IGNORED_KSERVE = {
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "priority",
    "timeout",
    "binary_data_output",
    "stream",
    "headers",
}


def build(values: dict[str, Any], vocab_size: int | None) -> SamplingParams:
    """Construct and validate SamplingParams (unset values: its defaults, the same on every
    path); any problem becomes INVALID_ARGUMENT."""
    try:
        return SamplingParams(**values).validate(vocab_size or None)
    except InvalidSamplingParamsError as exc:
        raise invalid(f"sampling parameter {exc}") from None
    except (TypeError, ValueError) as exc:
        raise invalid(f"sampling parameters are not valid: {exc}") from None


def from_proto(msg: Any, vocab_size: int | None) -> SamplingParams:
    """SamplingParams from an engine.v1.SamplingParams message (unset fields: defaults)."""
    values: dict[str, Any] = {f: getattr(msg, f) for f in SCALAR_FIELDS if msg.HasField(f)}
    values["stop_token_ids"] = tuple(msg.stop_token_ids)
    values["stop"] = tuple(msg.stop)
    values["ignore_eos"] = msg.ignore_eos
    return build(values, vocab_size)


def _kserve_value(name: str, param: Any) -> Any:
    kind = param.WhichOneof("parameter_choice")
    if kind is None:
        raise invalid(f"parameter {name!r} has no value")
    value = getattr(param, kind)
    if name in _INT_FIELDS and kind == "double_param":
        if not float(value).is_integer():
            raise invalid(f"parameter {name!r} must be an integer, got {value!r}")
        value = int(value)
    if name == "temperature" and kind in ("int64_param", "uint64_param"):
        value = float(value)
    if name in SCALAR_FIELDS and kind in ("bool_param", "string_param"):
        raise invalid(f"parameter {name!r} must be a number, got {kind.split('_')[0]} {value!r}")
    return value


def _string_list(name: str, value: Any) -> list[Any]:
    if not isinstance(value, str):
        raise invalid(f"parameter {name!r} must be a string (one value or a JSON list)")
    if value.startswith("["):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as exc:
            raise invalid(f"parameter {name!r} is not a JSON list: {exc}") from None
        if not isinstance(items, list):
            raise invalid(f"parameter {name!r} must be a JSON list")
        return items
    return [value]


def from_kserve(parameters: Mapping[str, Any], vocab_size: int | None) -> SamplingParams:
    """SamplingParams from KServe request parameters (``temperature``, ``max_tokens``, ...).

    ``stop`` is one string or a JSON list of strings; ``stop_token_ids`` a JSON list of ints.
    Names starting with ``triton_`` and the ones tritonclient sends on its own are ignored; any
    other unknown name is refused so a typo is not silently ignored.
    """
    values: dict[str, Any] = {}
    for name, param in parameters.items():
        if name.startswith("triton_") or name in IGNORED_KSERVE:
            continue
        if name in SCALAR_FIELDS:
            values[name] = _kserve_value(name, param)
        elif name == "ignore_eos":
            if param.WhichOneof("parameter_choice") != "bool_param":
                raise invalid("parameter 'ignore_eos' must be a bool")
            values[name] = param.bool_param
        elif name == "stop":
            values[name] = tuple(_string_list(name, _kserve_value(name, param)))
        elif name == "stop_token_ids":
            items = _string_list(name, _kserve_value(name, param))
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in items):
                raise invalid("parameter 'stop_token_ids' must be a JSON list of integers")
            values[name] = tuple(items)
        else:
            known = ", ".join((*SCALAR_FIELDS, "ignore_eos", "stop", "stop_token_ids"))
            raise invalid(f"unknown parameter {name!r}; sampling parameters are: {known}")
    return build(values, vocab_size)
