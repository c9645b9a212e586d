"""flash-attention's tolerance rule, shared by the kernel tests and benchmarks."""
from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_within_rule(out: torch.Tensor, ref32: torch.Tensor, ref_same: torch.Tensor, dtype: torch.dtype,
                       what: str) -> None:
    """The kernel's error against the fp32 reference is at most twice PyTorch's error in the same dtype
    (ref_same), plus an atol by dtype. NaN/inf never passes."""
    out, ref32, ref_same = out.float(), ref32.float(), ref_same.float()
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out - ref32).abs()
    torch_err = (ref_same - ref32).abs().max().item()
    bound = 2 * torch_err + ATOL[dtype]
    msg = (f"{what} {dtype}: kernel max err {err.max().item():.3g} (mean {err.mean().item():.3g}), "
           f"torch-in-{dtype} max err {torch_err:.3g}, bound {bound:.3g}")
    print(msg)
    assert err.max().item() <= bound, msg
