"""Mixture-of-experts SwiGLU on the CPU: (token, slot) assignments sorted by expert, one GEMM pair per expert.

Same contract as kernels/moe.py's moe_ref: x [T, D]; w_gate/w_up [E, I, D]; w_down [E, D, I]; weights/ids [T, k].

The assignments are sorted by expert once, each expert multiplies its contiguous run of the sorted batch, and the
down projections land in one [T*k, D] buffer (no concatenation), which is weighted and summed per token. Where
the CPU kernel builds (engine/model/cpu_kernel.py: AVX2, a C compiler; float32 or bfloat16 experts; AVX512 and
AVX512-BF16 variants chosen at run time) each projection of all experts is one grouped_mm call that reads every
expert weight once (`_grouped`), when the experts average at most GROUPED_MAX_ROWS[kernel] rows; otherwise each
expert runs its own torch GEMM pair (`_looped`). 16-bit weights on CPUs without native 16-bit GEMMs (engine/model/upcast.py) are converted to float32 one
expert at a time (a slice that stays in cache) and multiplied in float32; gate and up are rounded to the
activation dtype before SiLU, as the model's own dtype would. The per-expert counts are read on the host, which
on the CPU is no device sync.

Measured alternative, not used: scattering the assignments into a zero-padded [E, C, D] batch for one batched
GEMM per projection (C = the busiest expert's count) was 1.5-2x slower than the loop at 32-128 query tokens with
64 experts (the padding triples the work at C ~ 3x the mean, and bmm gains nothing on thin matrices).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_kernel import grouped_mm, isa
from .upcast import uses_upcast


GROUPED_MAX_ROWS = {"avx2": 24, "avx512": 256, "avx512_bf16": 48}
"""grouped_mm runs when the experts average at most this many rows (by the kernel that runs: cpu_kernel.isa(), and
avx512_bf16 only for bf16 activations and weights); with more rows per expert (long prefills) the per-expert torch
GEMMs are faster. Measured, one MoE layer of 64 x 352 experts, d1024, top-8, 1 thread, grouped against looped:
- avx2 (AVX2-only AMD EPYC): 1.5x / 2.2x faster f32 / bf16 at 32 tokens, 1.2x / 1.6x at 128, 0.8x / 0.96x at 512;
- avx512, float32 (AVX512-BF16 EPYC, Zen 5; the loop's MKL takes its AVX2 path there): 2x faster at 8-32 rows per
  expert, 1.6x at 64, 1.1-1.4x at 128-256 (the limit: not measured beyond);
- avx512_bf16 (same CPU, against oneDNN's native bf16 GEMMs): 2.3x at 8 rows, 1.4x at 32, 1.2x at 48, 1.0x at 64.
The choice depends on the step's row count, so a row's bits can differ between steps either side of the limit (as
with the single limit before; a higher limit moves that edge to larger steps)."""


def moe_cpu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
            weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """moe_ref's contract, one GEMM pair per expert over its sorted run (see the module docstring)."""
    T, k = ids.shape
    E = w_gate.shape[0]
    if T == 0:
        return torch.zeros_like(x)
    flat = ids.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)  # [T*k] assignments grouped by expert
    token_of = order // k  # [T*k]
    counts = torch.bincount(flat, minlength=E)  # [E]
    xs = x.index_select(0, token_of)  # [T*k, D] (advanced indexing copies the same rows ~10x slower on the CPU)
    ys = _grouped(xs, counts, w_gate, w_up, w_down) if T * k <= _max_rows(x, w_gate) * E else None  # [T*k, D]
    if ys is None:
        ys = _looped(xs, counts.tolist(), w_gate, w_up, w_down)  # [T*k, D]
    ys = ys * weights.reshape(-1).index_select(0, order)[:, None]  # [T*k, D]
    return torch.zeros_like(x).index_add_(0, token_of, ys)


def _max_rows(x: torch.Tensor, w: torch.Tensor) -> int:
    """GROUPED_MAX_ROWS of the grouped kernel that would multiply x by w here (0 where none runs)."""
    kind = isa()
    if kind == "avx512_bf16" and not x.dtype == w.dtype == torch.bfloat16:
        kind = "avx512"  # float32 activations: the AVX512 float32 kernel
    return GROUPED_MAX_ROWS.get(kind, 0)


def _swiglu(gate: torch.Tensor, up: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    gate, up = gate.to(dtype), up.to(dtype)
    return F.silu(gate) * up


def _grouped(xs: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
             w_down: torch.Tensor) -> torch.Tensor | None:
    """xs [N, D] sorted by expert -> [N, D]: each projection of every expert in one grouped_mm call
    (engine/model/cpu_kernel.py: bfloat16 activations and weights multiply natively where the CPU has AVX512-BF16,
    anything else in float32); None where that kernel does not run (then _looped)."""
    gate = grouped_mm(xs, counts, w_gate)  # [N, I] float32
    if gate is None:
        return None
    h = _swiglu(gate, grouped_mm(xs, counts, w_up), xs.dtype)  # [N, I]
    return grouped_mm(h, counts, w_down).to(xs.dtype)  # [N, D]


def _looped(xs: torch.Tensor, counts: list[int], w_gate: torch.Tensor, w_up: torch.Tensor,
            w_down: torch.Tensor) -> torch.Tensor:
    """xs [N, D] sorted by expert -> [N, D], one GEMM pair per expert that has assignments."""
    upcast = uses_upcast(w_gate)
    cdt = torch.float32 if upcast else xs.dtype
    out = torch.empty(xs.shape[0], xs.shape[1], dtype=cdt, device=xs.device)  # [N, D]
    xc = xs.to(cdt)  # [N, D]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xe = xc[start:start + n]  # [n, D]
        h = _swiglu(xe @ w_gate[e].to(cdt).T, xe @ w_up[e].to(cdt).T, xs.dtype)  # [n, I]
        torch.mm(h.to(cdt), w_down[e].to(cdt).T, out=out[start:start + n])
        start += n
    return out.to(xs.dtype)
