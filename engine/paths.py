"""Where the engine caches derived data (tokenizers, token arrays) between runs."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "ENGINE_CACHE_DIR"


def cache_dir() -> Path:
    """Return the cache directory: $ENGINE_CACHE_DIR, else ~/.cache/engine (created on demand)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "engine")
    root.mkdir(parents=True, exist_ok=True)
    return root
