"""Load-time fusion of projections that read the same input: q/k/v into one GEMM, gate/up into one GEMM.

One wider GEMM instead of three (two) narrow ones: fewer launches and reads of the activations on a GPU. The
separate modules are dropped so their weights are not held twice. MoE experts need nothing here: the Triton
grouped GEMM (kernels/moe.py) already computes gate and up of a tile in one pass over its tokens.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import MLP, Attention


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([p.weight for p in parts])  # [sum(out), in]
    has_bias = parts[0].bias is not None
    out = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
    out.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:
        out.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return out


def fuse_projections(net: nn.Module) -> nn.Module:
    """In place: every Attention gets qkv_proj, every dense MLP gate_up_proj. Returns net."""
    for mod in net.modules():
        if isinstance(mod, Attention) and mod.qkv_proj is None:
            mod.qkv_proj = _fused_linear([mod.q_proj, mod.k_proj, mod.v_proj])
            mod.q_proj = mod.k_proj = mod.v_proj = None
        elif isinstance(mod, MLP) and mod.gate_up_proj is None:
            mod.gate_up_proj = _fused_linear([mod.gate_proj, mod.up_proj])
            mod.gate_proj = mod.up_proj = None
    return net
