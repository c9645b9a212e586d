"""The CPU's own grouped thin GEMM for mixture-of-experts (engine/model/grouped_mm.c), built on first use.

Why: at the engine's step sizes an expert sees a handful of rows (32 query tokens x top-8 of 64 experts: ~4), and
MKL's sgemm at M = 4 reads a [352, 1024] expert weight at 5-11 GB/s on this CPU, a third to a half of what one core
streams (~20 GB/s), with a call per expert and projection. grouped_mm.c runs every expert of a projection in one
call, reads each weight byte once, and widens bf16 weights in registers (no converted copy).

`grouped_mm(x, counts, w)` -> [rows, N] float32, or None when the kernel is unavailable (no AVX2/FMA, no C
compiler, UNMASK_CPU_KERNELS=0): callers then use their torch path. The shared object is compiled once with the
system C compiler (`cc -O3 -mavx2 -mfma`, ~1 s) into $UNMASK_CACHE_DIR or ~/.cache/unmask/kernels, named by the
source's hash, and reused by later processes.

`thin_mm(x, w)` is the same kernel over one weight (the lm_head, engine/head_linear.py), THIN_ROWS rows a
call so that a call's activation rows stay in L2 while the weight streams past them.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("grouped_mm.c")


def _cache_dir() -> Path:
    root = os.environ.get("UNMASK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "unmask")
    return Path(root) / "kernels"


def _cpu_ok() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("UNMASK_CPU_KERNELS", "1") == "0" or not _cpu_ok():
        return None
    src = _SOURCE.read_bytes()
    so = _cache_dir() / f"grouped_mm-{hashlib.sha256(src).hexdigest()[:16]}.so"
    try:
        if not so.exists():
            cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
            if cc is None:
                log.warning("no C compiler: CPU MoE uses the torch expert loop")
                return None
            so.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=so.parent) as tmp:  # build aside, then rename: no half-written .so
                out = Path(tmp) / so.name
                subprocess.run([cc, "-O3", "-mavx2", "-mfma", "-shared", "-fPIC", "-o", str(out), str(_SOURCE)],
                               check=True, capture_output=True, timeout=120)
                os.replace(out, so)
        lib = ctypes.CDLL(str(so))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("CPU MoE kernel unavailable (%s): using the torch expert loop", e)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.grouped_mm.argtypes = [p, p, i64, i64, i64, p, ctypes.c_int, p]
    lib.grouped_mm.restype = None
    return lib


def available() -> bool:
    """Whether grouped_mm runs here (builds the kernel on first call)."""
    return _library() is not None


def grouped_mm(x: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x [rows, K] float32 sorted by expert, counts [E] int64 (rows of each expert, summing to rows), w [E, N, K]
    float32 or bfloat16 on the CPU -> [rows, N] float32 (row r of expert e: x[r] @ w[e].T); None if unavailable."""
    lib = _library()
    if lib is None or w.dtype not in (torch.float32, torch.bfloat16):
        return None
    x, counts, w = x.contiguous(), counts.contiguous(), w.contiguous()
    assert x.dtype == torch.float32 and counts.dtype == torch.int64 and x.shape[1] == w.shape[2]
    assert counts.numel() == w.shape[0] and int(counts.sum()) == x.shape[0]
    E, N, K = w.shape
    out = torch.empty(x.shape[0], N, dtype=torch.float32)  # [rows, N]
    lib.grouped_mm(x.data_ptr(), counts.data_ptr(), E, K, N, w.data_ptr(), int(w.dtype == torch.bfloat16),
                   out.data_ptr())
    return out


THIN_ROWS = 32
"""Rows per thin_mm call: the [32, K] activations stay in L2 while the weight streams past them (measured on
lm_head [M, 256|1024] x [.., 32000], M = 64-256: 32 rows a call 1.05-1.4x faster than one call; 8 rows 1.2x slower
than 32)."""


def thin_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x [M, K] float32, w [N, K] float32 or bfloat16 on the CPU -> x @ w.T [M, N] float32, THIN_ROWS rows a kernel
    call; None if the kernel is unavailable. A row's result is the same whatever M and its place (one dot product
    over K in a fixed order), so it needs no row padding for batch invariance."""
    lib = _library()
    if lib is None or w.dtype not in (torch.float32, torch.bfloat16):
        return None
    x, w = x.contiguous(), w.contiguous()
    assert x.dtype == torch.float32 and x.shape[1] == w.shape[1]
    (M, K), N = x.shape, w.shape[0]
    out = torch.empty(M, N, dtype=torch.float32)  # [M, N]
    counts = torch.empty(1, dtype=torch.int64)
    bf16 = int(w.dtype == torch.bfloat16)
    for m0 in range(0, M, THIN_ROWS):
        rows = min(THIN_ROWS, M - m0)
        counts[0] = rows
        lib.grouped_mm(x[m0].data_ptr(), counts.data_ptr(), 1, K, N, w.data_ptr(), bf16, out[m0].data_ptr())
    return out
