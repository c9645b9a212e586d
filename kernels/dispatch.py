"""Which implementation the model runs: "triton" kernels or the "torch" paths.

`resolve_kernels(choice, device)` turns the user's choice into a backend once, at load time:
- "auto": Triton on CUDA devices (when triton imports), torch elsewhere;
- "triton": the kernels, on CUDA or, on CPU, interpreted (only with TRITON_INTERPRET=1 set before triton was
  first imported); anything else is an error, never a silent fallback to torch;
- "torch": the plain torch paths.
The choice comes from the argument, else the UNMASK_KERNELS environment variable, else "auto".
"""
from __future__ import annotations

import os

import torch

KERNEL_CHOICES = ("auto", "triton", "torch")
ENV_VAR = "UNMASK_KERNELS"


class KernelBackendError(ValueError):
    pass


def _triton_status() -> str | None:
    """None when triton imports; else why not."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton cannot be imported ({e})"
    return None


def interpreted() -> bool:
    """Whether this process's kernels were compiled for the Triton interpreter (decided when triton jits them)."""
    from triton.runtime.interpreter import InterpretedFunction
    from .attention import _attn_fwd_kernel
    return isinstance(_attn_fwd_kernel, InterpretedFunction)


def resolve_kernels(choice: str | None, device: torch.device | str) -> str:
    """-> "triton" or "torch" for a model on `device`. Raises KernelBackendError naming the problem."""
    source = "kernels"
    if choice is None:
        choice, source = os.environ.get(ENV_VAR) or "auto", ENV_VAR if os.environ.get(ENV_VAR) else "kernels"
    choice = choice.strip().lower()
    if choice not in KERNEL_CHOICES:
        raise KernelBackendError(f"{source}: must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")
    dev = torch.device(device)
    if choice == "torch":
        return "torch"
    problem = _triton_status()
    if choice == "auto":
        return "triton" if dev.type == "cuda" and problem is None else "torch"
    if problem is not None:
        raise KernelBackendError(f"{source}=triton: {problem}")
    if dev.type == "cuda":
        if interpreted():
            raise KernelBackendError(f"{source}=triton on {dev}: triton was imported with TRITON_INTERPRET=1; "
                                     f"unset it to run compiled kernels on the GPU")
        return "triton"
    if dev.type == "cpu":
        if not interpreted():
            raise KernelBackendError(f"{source}=triton on cpu: needs the Triton interpreter; set TRITON_INTERPRET=1 "
                                     f"in the environment before starting (or use kernels=torch)")
        return "triton"
    raise KernelBackendError(f"{source}=triton: no Triton backend for device {dev}")
