"""Hook specifications: every extension point of the engine, each prefixed ``engine_``.

Plugins implement these with ``@engine.hookimpl``. Built-in plugins (``plugins/`` and
``exporters/``) register through the same manager as third-party packages.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT_NAME = "engine"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def engine_register_architectures() -> list[Any]:
    """Return the Architecture instances this plugin provides."""


@hookspec
def engine_register_export_formats() -> list[Any]:
    """Return the ExportFormat instances (e.g. onnx, tensorrt) this plugin provides."""


@hookspec
def engine_register_backends() -> list[Any]:
    """Return the runtime Backend factories (e.g. onnxruntime, tensorrt) this plugin provides."""


@hookspec
def engine_register_hf_families() -> list[Any]:
    """Return the HFFamily objects (a transformers class mapped onto an architecture) provided."""
