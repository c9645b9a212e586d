"""The lm_head on CPU: the thin-GEMM kernel (engine/model/cpu_kernel.py's thin_mm) at the real row count.

Why: the head multiplies only the step's decoded positions (the still-masked ones of the current blocks: 1-32 rows
for one request), against the largest weight of the model ([V, D], V = 32k-150k). MKL's sgemm at those few rows
neither streams the weight at memory speed nor keeps its rounding the same below 4 rows, so engine/shape_buckets.py
padded them to 16, a 16-row GEMM for one decoded position. The kernel reads each weight byte once per 32 rows,
widens bf16 weights in registers (no converted copy) and computes each logit as one dot product over D in a fixed
order, so a row's logits do not depend on the rows batched with it without any padding. Measured (one thread,
lm_head [M, D] x [D, 32000], against the padded GEMM) on an AVX2-only AMD EPYC: D = 256, M = 1-16: 1.8-3.5x
(float32), 5.5x (bf16 against the upcast GEMM); D = 1024: 1.1-4x (f32), 1.3-5x (bf16); M = 128-256: 0.8-1.0x.

`HeadLinear` is a BucketedLinear (same parameters and state dict) whose forward takes that kernel when it runs
here and wins (float32 weight, or bfloat16 on a CPU without native bf16 GEMMs; on the CPU, no bias, inference) and
the bucketed path otherwise (native bf16, no C compiler, UNMASK_CPU_KERNELS=0, float16). Measured on an AVX512-BF16
AMD EPYC, one thread: float32 D = 256 / 1024, M = 1-16: 1.8-5.2x, M = 32-128: 1.06-1.55x. `thin_head(net)` makes net.lm_head one.
"""
from __future__ import annotations

import torch
from torch import nn

from .shape_buckets import BucketedLinear
from .model.cpu_kernel import thin_mm
from .model.upcast import onednn_f32, uses_upcast


def thin_wins(weight: torch.Tensor) -> bool:
    """Whether the kernel beats the bucketed GEMM for this weight: float32 where MKL runs it (MKL pads to 16 rows;
    with oneDNN's AVX512 GEMM, upcast.onednn_f32, the kernel wins only below ~8 rows: [16, 1024] x [1024, 32000]
    0.8x, 64 rows 0.45x); bfloat16 / float16 only where the CPU has no native 16-bit GEMM (upcast.py's slices). With
    native bf16 (oneDNN on AVX512-BF16 / AMX) the AVX2 kernel is slower from 8 rows on (lm_head [16, 1024] x [1024,
    32000]: 0.59x), so the head stays bucketed there. Depends on the weight only, never on the row count, so a row's
    logits cannot depend on its batch."""
    return (weight.dtype == torch.float32 and not onednn_f32()) or uses_upcast(weight)


class HeadLinear(BucketedLinear):
    """The output head: logits [..., V] from hidden [..., D] through thin_mm (float32 out, also for a bf16 model)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and x.device.type == "cpu" and not torch.is_grad_enabled() and thin_wins(self.weight):
            y = thin_mm(x.reshape(-1, x.shape[-1]).float(), self.weight)  # [M, V] float32
            if y is not None:
                return y.view(*x.shape[:-1], y.shape[-1])
        return super().forward(x)


def thin_head(net: nn.Module) -> nn.Module:
    """In place: net.lm_head (a BucketedLinear) becomes a HeadLinear. Returns net."""
    net.lm_head.__class__ = HeadLinear
    return net
