"""Handing freed heap memory back to the operating system while layers are built one by one.

Quantizing a layer makes fp32/int32 temporaries several times the size of its weight. They are freed
when the layer is done, but glibc keeps freed blocks below its (self-raising) mmap threshold in the
process heap, so over hundreds of layers the resident size grew by gigabytes of free memory.
malloc_trim(0) after each layer returns it; elsewhere (another libc, another OS) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return freed heap memory to the OS; True if the allocator supports it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
