"""Config dataclasses to and from JSON and ``--config key=value`` overrides, with clear errors."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from engine.errors import EngineError


class ConfigError(EngineError):
    """Raised for an unknown config key or a value that does not parse as the field's type."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, str) for f in dataclasses.fields(cls)}


def _parse_scalar(raw: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw.lower() in ("none", "null") and len(args) < len(typing.get_args(typ)):
            return None
        return _parse_scalar(raw, args[0], key)
    if origin is tuple or typ is tuple:
        args = typing.get_args(typ) or (str,)
        item = args[0]
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        return tuple(_parse_scalar(p, item, key) for p in parts)
    try:
        if typ is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
    except ValueError:
        name = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"config {key}={raw!r}: expected {name}") from None
    return raw


def parse_overrides(cls: type, pairs: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings against the fields of config dataclass ``cls``."""
    types_ = _field_types(cls)
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--config expects key=value, got {pair!r}")
        key, raw = (s.strip() for s in pair.split("=", 1))
        if key not in types_:
            raise ConfigError(
                f"unknown config key {key!r}; known keys: {', '.join(sorted(types_))}"
            )
        out[key] = _parse_scalar(raw, types_[key], key)
    return out


def make_config(cls: type, values: dict[str, Any]) -> Any:
    """Instantiate ``cls`` from JSON-like values (lists become tuples), rejecting unknown keys."""
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known: {sorted(types_)}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        cfg = cls(**fixed)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {cls.__name__}: {exc}") from None
    return cfg


def config_to_dict(config: Any) -> dict[str, Any]:
    """Return a JSON-serialisable dict of a config dataclass."""
    return dataclasses.asdict(config)
