"""Handing a daemon's freed heap back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Collect garbage cycles, then give the heap's free pages back to the OS.

    CPython frees a flush's copies at once, but glibc's malloc keeps the pages for
    reuse, so without this a daemon's RSS stays at its peak after a flush under load
    (docs/design/group.md, "Flush costs")."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
