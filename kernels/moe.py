"""Mixture-of-experts SwiGLU dispatch.

`moe_ref` is the obviously-correct loop over (token, slot) pairs grouped by expert; `fused_moe` is the entry point
the model calls (a sorted grouped path in torch; a Triton grouped GEMM on CUDA can slot in behind it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
            weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [T, D]; w_gate/w_up [E, I, D]; w_down [E, D, I]; weights/ids [T, k] -> [T, D]."""
    out = torch.zeros_like(x)
    for e in range(w_gate.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        h = F.silu(x[tok] @ w_gate[e].T) * (x[tok] @ w_up[e].T)  # [n, I]
        out.index_add_(0, tok, (h @ w_down[e].T) * weights[tok, slot, None])
    return out


def fused_moe(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Same contract as moe_ref: tokens sorted by expert, one GEMM pair per expert that received tokens."""
    T, k = ids.shape
    flat = ids.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)  # [T*k]
    token_of = order // k  # [T*k]
    counts = torch.bincount(flat, minlength=w_gate.shape[0]).tolist()
    xs = x[token_of]  # [T*k, D]
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xe = xs[start:start + n]  # [n, D]
        h = F.silu(xe @ w_gate[e].T) * (xe @ w_up[e].T)  # [n, I]
        outs.append(h @ w_down[e].T)  # [n, D]
        start += n
    ys = torch.cat(outs) * weights.reshape(-1)[order, None]  # [T*k, D]
    return torch.zeros_like(x).index_add_(0, token_of, ys)
