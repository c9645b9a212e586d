"""Giving freed memory back to the OS after large request bodies.

A request body of many MiB is read, parsed and dropped within one request, but glibc's allocator keeps the freed
heap (and raises its mmap threshold after freeing a large block, so the next large body lands on the heap too):
20 concurrent 31 MiB bodies used to leave the server ~300 MiB larger for good. After a request whose body was at
least TRIM_AFTER_BYTES, `release_freed_memory()` calls malloc_trim(0), which returns the free pages of every arena
to the OS: when the last of the large requests in flight ends, and otherwise at most once per TRIM_INTERVAL seconds
(it walks the heap). A no-op where glibc is not the allocator.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time

TRIM_AFTER_BYTES = 1 << 20
TRIM_INTERVAL = 0.5

_last = 0.0
_trim = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim = getattr(_libc, "malloc_trim", None)
except OSError:  # pragma: no cover - not glibc
    _trim = None


def release_freed_memory(last_one: bool = True) -> bool:
    """malloc_trim(0) when `last_one` (no other large request in flight) or when it has not run for TRIM_INTERVAL;
    True if it ran."""
    global _last
    now = time.monotonic()
    if _trim is None or (not last_one and now - _last < TRIM_INTERVAL):
        return False
    _last = now
    _trim(0)
    return True
