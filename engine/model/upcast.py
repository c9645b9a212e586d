"""The CPU's GEMM rule for every Linear of a loaded model (`linear(x, w, b)`, which engine/shape_buckets.py's
BucketedLinear calls at bucketed row counts):
- a weight kept in oneDNN's blocked layout (`packs` / `pack_weight`, done at load by shape_buckets.pack_linears):
  oneDNN's inner product (`onednn_mm`);
- bfloat16 / float16 weights on CPUs without native 16-bit GEMMs: `upcast_mm` (below);
- float32 on AVX512 CPUs: oneDNN (`onednn_f32`), else MKL, 256 columns a call for wide weights (`split_mm`).

bfloat16 / float16 GEMMs on CPUs without native 16-bit matrix instructions: weights stay 16-bit in memory, each
GEMM runs in float32 on weight slices converted as they are used.

On a CPU without AVX512-BF16 / AVX-NE-CONVERT / AMX (oneDNN's `_is_mkldnn_bf16_supported()` is False; e.g. AVX2-only
machines), torch's bf16 matmul falls back to slow kernels: ~6x slower than the float32 GEMM of the same shape.
Here the weight is converted `CHUNK` output rows at a time (a slice that stays in cache) and multiplied in float32
into a column slice of the output, which is rounded back to the activation dtype once. Inputs are exact in
float32, products accumulate in float32 (what a native bf16 GEMM does too), so the result is that of a 16-bit
GEMM with float32 accumulation; memory holds the 16-bit weights only. `upcast_mm` is that product on its own.

float32 GEMMs with a wide weight (N >= SPLIT_MIN_N output columns, no bias: the MLP's gate/up, lm_head) run
over CHUNK-column slices of the output where MKL runs them (`split_mm`): at the engine's few query rows (M = 16-128) MKL's single-call
sgemm streams the whole weight badly on an AVX2 AMD CPU (23-38 GF/s for lm_head at M = 16-32, 67 GF/s for
[128, 1024] x [1024, 2816] against 82 GF/s at N = 1024); one call per 256 columns keeps each slice in cache:
lm_head 1.4-1.75x and gate/up 1.1-1.25x faster (thread time, interleaved). Each output element is the same
dot product over K in the same order, so the result is bitwise F.linear's (tests/test_cpu_path.py checks it).
Measured and not kept: float32 weights
stored column-major made MKL's GEMMs 5-15% faster, but its products are not bitwise those of the row-major layout
for every shape (small M), and float32 tokens must not change.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

CHUNK = 256
"""Weight rows converted per slice: 256 x 1024 float32 = 1 MiB, inside a core's L2 on current server CPUs."""
SPLIT_MIN_N = 2048
"""float32 weights with at least this many output rows (and no bias) are multiplied CHUNK columns at a time. Below
it (q/k/v/o, down at d1024) one call is as fast (measured 0.9-1.0x split)."""
SPLIT_MIN_K = 512
"""...and at least this many input features: at K = 256 the slices' call overhead outweighs the cache gain (lm_head
[16, 256] x [256, 32000]: split 0.88x, [.., 256] x [256, 2048]: 0.46-0.93x; K = 512: 1.1-1.3x, K = 1024: 1.2-2x at
M >= 4; thread time, one core). The choice depends on the weight only, never on the row count, so a row's
result cannot depend on its batch."""
_HALF = (torch.bfloat16, torch.float16)


@functools.cache
def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU has native 16-bit GEMM kernels for dtype (oneDNN's own test)."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def upcast_mm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] (any float dtype), w [N, K] 16-bit (bias [N]) -> x @ w.T + bias [M, N] in out_dtype (default
    x.dtype), computed in float32 over CHUNK-row slices of w and rounded once."""
    xf = x.float()  # [M, K]
    N = w.shape[0]
    out = torch.empty(x.shape[0], N, dtype=torch.float32, device=x.device)  # [M, N]
    with torch.no_grad():  # inference only: mm(out=...) has no autograd
        for n0 in range(0, N, CHUNK):
            torch.mm(xf, w[n0:n0 + CHUNK].float().t(), out=out[:, n0:n0 + CHUNK])
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype or x.dtype)


def split_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N] (same dtype), one GEMM per CHUNK columns of the output (see the module
    docstring); bitwise F.linear(x, w) with MKL's sgemm."""
    N = w.shape[0]
    out = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)  # [M, N]
    for n0 in range(0, N, CHUNK):
        torch.mm(x, w[n0:n0 + CHUNK].t(), out=out[:, n0:n0 + CHUNK])
    return out


@functools.cache
def onednn_f32() -> bool:
    """Whether float32 GEMMs on this CPU go through oneDNN instead of MKL: where torch's CPU capability is AVX512
    (UNMASK_ONEDNN_F32=0 turns it off). MKL takes its AVX2 code path on AMD CPUs; oneDNN uses AVX512 on any
    vendor: measured on an AVX512 AMD EPYC, one thread, [128, 1024] x [1024, 3072 | 5632], [128, 2816] x [2816,
    1024]: 191-201 / 174 GF/s against MKL's 74-84 (2.1-2.7x), [32, 1024] x [1024, 5632] 2x. Its rows are the same
    at every bucket size and place (checked like MKL's: 220 rows, 60 sizes, bitwise), so batch invariance holds."""
    return (torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
            and os.environ.get("UNMASK_ONEDNN_F32", "1") != "0")


def onednn_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N] through oneDNN's inner product; weight plain or packed
    (pack_weight), float32 or bfloat16 (x the same dtype)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


PACK_ROWS = 32
"""The row count oneDNN's weight reorder is told to expect (its blocking hint; the packed weight serves any M)."""


def packs(w: torch.Tensor) -> bool:
    """Whether a CPU weight is kept in oneDNN's blocked layout (pack_weight): where oneDNN runs its GEMMs (float32
    with onednn_f32, bfloat16 with native bf16 GEMMs). UNMASK_PACK_WEIGHTS=0 keeps the plain layout. Measured on an
    AVX512-BF16 EPYC, one thread, against the same GEMM on the plain weight: bf16 [32, 1024] x [1024, 5632 | 32000]
    1.3x, [16, 1024] x [1024, 3072] 1.4x, 128 rows 1.07-1.1x; float32 1.3x / 1.7x at 32 / 16 rows. Rows keep the
    same bits at every bucket size and place (220 rows over 60 sizes, bf16 and f32)."""
    native = (w.dtype == torch.float32 and onednn_f32()) or (w.dtype == torch.bfloat16 and native_half_gemm(w.dtype))
    return w.device.type == "cpu" and w.dim() == 2 and native and os.environ.get("UNMASK_PACK_WEIGHTS", "1") != "0"


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] -> the same weight in oneDNN's blocked layout (an mkldnn tensor of logical shape [N, K]; the plain
    one can be dropped: same bytes). linear() multiplies by it through onednn_mm."""
    return torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with 16-bit weights on CPUs without native 16-bit GEMMs multiplied by upcast_mm, and float32
    inference GEMMs through oneDNN where it has AVX512 (onednn_f32) or column-split MKL (split_mm); weights packed
    by pack_weight through oneDNN. x [..., K]."""
    if weight.is_mkldnn:
        return _rows(onednn_mm, x, weight, bias)
    if uses_upcast(weight):
        return _rows(upcast_mm, x, weight, bias)
    if x.dtype == weight.dtype == torch.float32 and weight.device.type == "cpu" and not torch.is_grad_enabled():
        if onednn_f32():
            return _rows(onednn_mm, x, weight, bias)
        if bias is None and weight.shape[0] >= SPLIT_MIN_N and weight.shape[1] >= SPLIT_MIN_K:
            return _rows(split_mm, x, weight)
    return F.linear(x, weight, bias)


def _rows(mm, x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
    """mm over x's rows flattened to [M, K], the result [M, N] viewed back as [..., N]."""
    y = mm(x.reshape(-1, x.shape[-1]), *args)  # [M, N]
    return y.view(*x.shape[:-1], y.shape[-1])


def uses_upcast(w: torch.Tensor) -> bool:
    """Whether GEMMs against weight w should go through upcast_mm."""
    return w.device.type == "cpu" and w.dtype in _HALF and not native_half_gemm(w.dtype)
