"""glibc allocator settings for CPU inference: keep the pages of a step's large temporaries mapped.

Why: glibc serves blocks above its mmap threshold (dynamic, at most 32 MiB) with a fresh mmap and unmaps them on
free, and it returns the top of the heap to the OS once more than its trim threshold is free. A CPU step allocates
and frees the same large temporaries every step (logits chunks of up to tens of MiB, [rows, 4 * d] GEMM outputs),
so their pages were faulted in again each step: at batch 16 (bf16, d256 x 4, 16 prompts of 64 + 64 tokens) ~280k
minor faults per 1024 generated tokens, ~0.4 s of a 3-6 s run. With fixed thresholds (MMAP_THRESHOLD, TRIM_THRESHOLD)
the freed blocks are reused from the heap: faults ~0, and the same run's thread-CPU tok/s went 310 -> 400 (prefix)
and 420 -> 520 (dual) (benchmarks/results/redesign_speed.md). The cost is resident memory: up to TRIM_THRESHOLD of
freed heap stays mapped until something calls malloc_trim (the server does after large request bodies,
server/memory.py).

`keep_freed_pages()` applies them once per process, when a CPU model loads (engine/loader.py). A no-op where glibc
is not the allocator, where the user set MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ themselves, or with
UNMASK_MALLOC_TUNING=0.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20
"""Blocks up to this size come from the heap (glibc's own dynamic threshold stops at 32 MiB)."""
TRIM_THRESHOLD = 512 << 20
"""Free memory at the heap's top beyond this goes back to the OS."""


@functools.cache
def keep_freed_pages() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring); True if they were set."""
    if os.environ.get("UNMASK_MALLOC_TUNING", "1") == "0":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False  # the user's own settings win
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
