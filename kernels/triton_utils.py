"""Launch settings shared by the kernels."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except ImportError:  # triton < 3.4 reads the variable directly
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_settings(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast) for tl.dot on `dtype` operands.

    fp32 dots run in IEEE precision (TF32 would lose the bits the fp32 path keeps). The Triton interpreter
    (TRITON_INTERPRET=1) computes bf16 dots wrongly, so there the kernels upcast bf16 operands to fp32 first:
    the same products (bf16 values are exact in fp32) with the same fp32 accumulation as the GPU's bf16 dot."""
    upcast = dtype == torch.bfloat16 and interpreting()
    return ("ieee" if dtype == torch.float32 or upcast else "tf32"), upcast
