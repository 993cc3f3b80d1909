"""The plugin manager: built-ins, entry points (group ``engine.plugins``) and ``ENGINE_PLUGINS``."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pluggy

from engine import hookspecs
from engine.errors import EngineError

ENTRY_POINT_GROUP = "engine.plugins"
ENV_VAR = "ENGINE_PLUGINS"

# Loaded exactly like third-party plugins; the engine never imports them anywhere else.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "plugins.decoder_lm",
    "plugins.text_classifier",
    "plugins.gan_generator",
    "plugins.bert_classifier",
    "exporters.onnx_format",
    "exporters.tensorrt_format",
    "exporters.torch_format",
    "engine.runtime.backends",
)


class UnknownArchitectureError(EngineError):
    """Raised when an architecture name is not registered by any plugin."""


class PluginLoadError(EngineError):
    """Raised when a plugin module named in ENGINE_PLUGINS or an entry point cannot load."""


@dataclass(frozen=True)
class PluginInfo:
    """Where a registered plugin came from."""

    name: str
    version: str
    source: str  # "built-in", "entry point <dist>", or "ENGINE_PLUGINS"


def _version_of(module: Any, dist: str | None) -> str:
    if dist:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return str(getattr(module, "__version__", None) or _engine_version())


def _engine_version() -> str:
    from engine import __version__

    return __version__


def get_plugin_manager() -> pluggy.PluginManager:
    """Create a plugin manager with built-ins, entry-point plugins and ENGINE_PLUGINS modules."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}

    def register(module: Any, name: str, dist: str | None, source: str) -> None:
        if pm.is_registered(module) or pm.has_plugin(name):
            return
        pm.register(module, name=name)
        infos[name] = PluginInfo(name, _version_of(module, dist), source)

    for modname in BUILTIN_PLUGINS:
        try:
            module = importlib.import_module(modname)
        except ImportError as exc:  # a broken install, not a user error, but say which module
            raise PluginLoadError(f"built-in plugin {modname} failed to import: {exc}") from exc
        register(module, modname, None, "built-in")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must say which one it is
            msg = f"entry point {ep.name!r} ({ep.value}) failed to load: {exc}"
            raise PluginLoadError(msg) from exc
        dist = ep.dist.name if ep.dist else None
        register(module, ep.name, dist, f"entry point ({dist or ep.value})")
    for modname in filter(None, (m.strip() for m in os.environ.get(ENV_VAR, "").split(","))):
        try:
            module = importlib.import_module(modname)
        except ImportError as exc:
            msg = f"{ENV_VAR} names {modname!r}, which cannot be imported: {exc}"
            raise PluginLoadError(msg) from exc
        register(module, modname, None, ENV_VAR)
    pm.check_pending()  # a misspelled hook name fails here, not silently
    pm.plugin_infos = infos  # type: ignore[attr-defined]
    return pm


@lru_cache(maxsize=4)
def _manager_for(env_value: str) -> pluggy.PluginManager:
    return get_plugin_manager()


def _cached_manager() -> pluggy.PluginManager:
    """One manager per process and ENGINE_PLUGINS value (entry points are read once)."""
    return _manager_for(os.environ.get(ENV_VAR, ""))


def plugin_info(pm: pluggy.PluginManager, plugin: Any) -> PluginInfo:
    """Return name, version and source of a registered plugin object."""
    return pm.plugin_infos[pm.get_name(plugin)]  # type: ignore[attr-defined]


def architectures(pm: pluggy.PluginManager | None = None) -> dict[str, tuple[Any, PluginInfo]]:
    """Map every registered architecture name to (architecture, providing plugin info)."""
    pm = pm or _cached_manager()
    found: dict[str, tuple[Any, PluginInfo]] = {}
    for impl in pm.hook.engine_register_architectures.get_hookimpls():
        info = plugin_info(pm, impl.plugin)
        for arch in impl.function() or []:
            if arch.name in found:
                other = found[arch.name][1].name
                raise PluginLoadError(
                    f"architecture {arch.name!r} registered by {other} and {info.name}"
                )
            found[arch.name] = (arch, info)
    return dict(sorted(found.items()))


def get_architecture(name: str, pm: pluggy.PluginManager | None = None) -> tuple[Any, PluginInfo]:
    """Look up one architecture; unknown names raise with the list of known ones."""
    known = architectures(pm)
    if name not in known:
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; known: {', '.join(known) or '(none)'}"
        )
    return known[name]


def _collect(hook_name: str, pm: pluggy.PluginManager | None) -> dict[str, Any]:
    pm = pm or _cached_manager()
    out: dict[str, Any] = {}
    for items in getattr(pm.hook, hook_name)():
        for item in items or []:
            out[item.name] = item
    return out


def export_formats(pm: pluggy.PluginManager | None = None) -> dict[str, Any]:
    """Map export format names to the ExportFormat objects plugins registered."""
    return _collect("engine_register_export_formats", pm)


def backends(pm: pluggy.PluginManager | None = None) -> dict[str, Any]:
    """Map backend names to the Backend factories plugins registered."""
    return _collect("engine_register_backends", pm)


def hf_families(pm: pluggy.PluginManager | None = None) -> dict[str, tuple[Any, PluginInfo]]:
    """Map Hugging Face architecture names (``GPT2LMHeadModel``) to (family, providing plugin)."""
    pm = pm or _cached_manager()
    found: dict[str, tuple[Any, PluginInfo]] = {}
    for impl in pm.hook.engine_register_hf_families.get_hookimpls():
        info = plugin_info(pm, impl.plugin)
        for family in impl.function() or []:
            if family.hf_architecture in found:
                other = found[family.hf_architecture][1].name
                raise PluginLoadError(
                    f"Hugging Face architecture {family.hf_architecture!r} claimed by {other} "
                    f"and {info.name}"
                )
            found[family.hf_architecture] = (family, info)
    return dict(sorted(found.items()))
