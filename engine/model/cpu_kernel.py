"""The CPU's own grouped thin GEMM for mixture-of-experts (engine/model/grouped_mm.c, grouped_mm_avx512.c), built on
first use.

Why: at the engine's step sizes an expert sees a handful of rows (32 query tokens x top-8 of 64 experts: ~4), and
MKL's sgemm at M = 4 reads a [352, 1024] expert weight at 5-11 GB/s on this CPU, a third to a half of what one core
streams (~20 GB/s), with a call per expert and projection. grouped_mm.c runs every expert of a projection in one
call, reads each weight byte once, and widens bf16 weights in registers (no converted copy).

`grouped_mm(x, counts, w)` -> [rows, N] float32, or None when the kernel is unavailable (no AVX2/FMA, no C
compiler, UNMASK_CPU_KERNELS=0): callers then use their torch path. The shared object is compiled once with the
system C compiler (`cc -O3 -mavx2 -mfma`, ~1 s; the AVX512 functions carry their own target attributes, and a
compiler that cannot build them gets the AVX2 file alone) into $UNMASK_CACHE_DIR or ~/.cache/unmask/kernels, named
by the sources' hash, and reused by later processes.

Which code runs is chosen at run time from the CPU (`isa()`; UNMASK_CPU_ISA=avx2 | avx512 caps it):
- float32 activations: grouped_mm.c's AVX2 loops, or on AVX512 CPUs grouped_mm_avx512, which gives the same bits
  (each 512-bit register holds two AVX2 accumulators), so float32 results do not depend on the CPU's ISA;
- bfloat16 activations with bfloat16 weights (a bf16 model's experts) on AVX512-BF16 CPUs: grouped_mm_bf16dot
  (VDPBF16PS, 32 products an instruction); elsewhere x is widened to float32 and takes the float32 kernel. Measured
  on an AVX512-BF16 EPYC (Zen 5), one thread, one MoE layer's three projections (64 x 352 experts, d1024, 256
  assignments), weights streamed from DRAM: bf16 9.6 ms (AVX2, widening) -> 5.0-6.4 ms (1.3-1.45x the time to just
  read the weights), float32 10.4-15.5 -> 9.8-12.6 ms (AVX512: 1.33x the read time; AVX2 1.38x).

attention_avx512.c (bf16 attention, engine/model/attention_cpu.py) is built into the same shared object with the
AVX512 file, and runs where isa() is avx512_bf16.

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
_SOURCE_AVX512 = Path(__file__).with_name("grouped_mm_avx512.c")
_HEADER = Path(__file__).with_name("grouped_mm_common.h")  # included by both sources
_SOURCE_ATTN = Path(__file__).with_name("attention_avx512.c")  # bf16 attention (attention_cpu.py), built beside them
ISAS = ("avx2", "avx512", "avx512_bf16")
"""The kernels' instruction sets, each a superset of the one before (grouped_cpu_isa() in grouped_mm_avx512.c)."""


def _cache_dir() -> Path:
    root = os.environ.get("UNMASK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "unmask")
    return Path(root) / "kernels"


def _cpu_ok() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _compile(cc: str, sources: list[Path], out: Path) -> bool:
    """Build sources into the shared object out; False if the compiler refuses them."""
    try:
        subprocess.run([cc, "-O3", "-mavx2", "-mfma", "-shared", "-fPIC", "-o", str(out), *map(str, sources)],
                       check=True, capture_output=True, timeout=120)
    except subprocess.CalledProcessError as e:
        log.info("C kernel build failed (%s): %s", [s.name for s in sources], e.stderr.decode()[-400:])
        return False
    return True


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("UNMASK_CPU_KERNELS", "1") == "0" or not _cpu_ok():
        return None
    srcs = b"".join(f.read_bytes() for f in (_SOURCE, _SOURCE_AVX512, _HEADER, _SOURCE_ATTN))
    so = _cache_dir() / f"grouped_mm-{hashlib.sha256(srcs).hexdigest()[:16]}.so"
    try:
        if not so.exists():
            cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
            if cc is None:
                log.warning("no C compiler: CPU MoE uses the torch expert loop")
                return None
            so.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=so.parent) as tmp:  # build aside, then rename: no half-written .so
                out = Path(tmp) / so.name
                if (not _compile(cc, [_SOURCE, _SOURCE_AVX512, _SOURCE_ATTN], out)
                        and not _compile(cc, [_SOURCE], out)):
                    raise subprocess.SubprocessError(f"{cc} cannot build {_SOURCE.name}")
                os.replace(out, so)
        lib = ctypes.CDLL(str(so))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("CPU MoE kernel unavailable (%s): using the torch expert loop", e)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.grouped_mm.argtypes = [p, p, i64, i64, i64, p, ctypes.c_int, p]
    lib.grouped_mm.restype = None
    if hasattr(lib, "grouped_cpu_isa"):  # built with the AVX512 file
        lib.grouped_cpu_isa.restype = ctypes.c_int
        lib.grouped_mm_avx512.argtypes = [p, p, i64, i64, i64, p, ctypes.c_int, p]
        lib.grouped_mm_avx512.restype = None
        lib.grouped_mm_bf16dot.argtypes = [p, p, i64, i64, i64, p, p]
        lib.grouped_mm_bf16dot.restype = None
        lib.attn_bf16.argtypes = [p, i64, i64, p, i64, i64, p, i64, i64, p, p, i64, i64, i64, i64, i64, i64,
                                  ctypes.c_float, i64, i64, p]
        lib.attn_bf16.restype = ctypes.c_int
    return lib


@functools.cache
def _best_isa() -> str | None:
    lib = _library()
    if lib is None:
        return None
    return ISAS[lib.grouped_cpu_isa()] if hasattr(lib, "grouped_cpu_isa") else "avx2"


def isa() -> str | None:
    """The instruction set the kernels run with here: one of ISAS (the CPU's best, capped by UNMASK_CPU_ISA), or
    None where the kernel is unavailable."""
    best = _best_isa()
    if best is None:
        return None
    cap = os.environ.get("UNMASK_CPU_ISA", best)
    if cap not in ISAS:
        raise ValueError(f"UNMASK_CPU_ISA={cap!r}: expected one of {', '.join(ISAS)}")
    return ISAS[min(ISAS.index(best), ISAS.index(cap))]


def bf16_dot() -> bool:
    """Whether grouped_mm multiplies bfloat16 activations by bfloat16 weights natively (AVX512-BF16)."""
    return isa() == "avx512_bf16"


def available() -> bool:
    """Whether grouped_mm runs here (builds the kernel on first call)."""
    return _library() is not None


def grouped_mm(x: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x [rows, K] float32 or bfloat16, sorted by expert, counts [E] int64 (rows of each expert, summing to rows), w
    [E, N, K] float32 or bfloat16 on the CPU -> [rows, N] float32 (row r of expert e: x[r] @ w[e].T); None if
    unavailable. bfloat16 x with bfloat16 w runs the VDPBF16PS kernel where the CPU has it (bf16_dot), any other x
    is multiplied in float32."""
    lib = _library()
    if lib is None or w.dtype not in (torch.float32, torch.bfloat16):
        return None
    dot = x.dtype == w.dtype == torch.bfloat16 and bf16_dot()
    x = x.contiguous() if dot else x.float().contiguous()
    counts, w = counts.contiguous(), w.contiguous()
    assert counts.dtype == torch.int64 and x.shape[1] == w.shape[2]
    assert counts.numel() == w.shape[0] and int(counts.sum()) == x.shape[0]
    E, N, K = w.shape
    out = torch.empty(x.shape[0], N, dtype=torch.float32)  # [rows, N]
    if dot:
        lib.grouped_mm_bf16dot(x.data_ptr(), counts.data_ptr(), E, K, N, w.data_ptr(), out.data_ptr())
    else:
        _f32_kernel(lib)(x.data_ptr(), counts.data_ptr(), E, K, N, w.data_ptr(), int(w.dtype == torch.bfloat16),
                         out.data_ptr())
    return out


def _f32_kernel(lib: ctypes.CDLL):
    """The float32-activation kernel for this CPU: AVX512 or AVX2, the same bits."""
    return lib.grouped_mm_avx512 if isa() in ("avx512", "avx512_bf16") else lib.grouped_mm


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
    kernel = _f32_kernel(lib)
    for m0 in range(0, M, THIN_ROWS):
        rows = min(THIN_ROWS, M - m0)
        counts[0] = rows
        kernel(x[m0].data_ptr(), counts.data_ptr(), 1, K, N, w.data_ptr(), bf16, out[m0].data_ptr())
    return out
