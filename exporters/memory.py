"""Give memory an export stage freed back to the operating system before the next stage.

At GPT-2 small, tracing, optimizing and validating each allocate and free gigabytes. glibc's
malloc keeps freed heap memory in the process for reuse (its mmap threshold grows with every
large block freed), so without a trim the resident set keeps the high-water mark of every
stage before it and the next stage's allocations add on top.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from functools import cache


@cache
def _malloc_trim():
    """glibc's ``malloc_trim`` or None (other C libraries, other systems)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Collect unreachable objects, then hand free heap pages back (glibc ``malloc_trim``)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
