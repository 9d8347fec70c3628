"""Giving freed memory back to the system after a prediction.

Each new image size makes torch allocate tensors of new shapes; glibc's allocator keeps the
freed blocks in its arenas, so the resident size of a long-running server creeps up with the
number of sizes it has served. ``release_freed_memory`` asks glibc to return free pages
(``malloc_trim(0)``: a few milliseconds); elsewhere (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Returns freed heap memory to the system where the C library can; True if it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
