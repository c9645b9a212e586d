"""Mixture-of-experts SwiGLU dispatch.

`moe_ref` is the obviously-correct loop over (token, slot) pairs grouped by expert; `fused_moe` is the torch path
the model calls on CPU (tokens sorted by expert, one GEMM pair per expert that received tokens).

`fused_moe_triton` is the GPU path, vLLM's fused-MoE recipe: the T*k (token, slot) assignments are sorted by
expert and each expert's run padded to the M tile, all on device (`align_by_expert`, no host sync: every size the
launch needs is an upper bound known on the host) -> one grouped GEMM over the padded runs computes gate and up
for a tile with SiLU(gate)*up fused in its epilogue -> a second grouped GEMM computes down with the routing weight
fused -> the k slots of each token are summed in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_utils import dot_settings


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


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> weights [T, k] fp32, expert ids [T, k]: softmax in fp32, top-k, optionally
    renormalised to sum 1 (RND1) or not (LLaDA-MoE)."""
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def route_sigmoid_group(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA2's router. logits [T, E] fp32 -> weights [T, k] fp32, expert ids [T, k]: s = sigmoid(logits);
    selection over s + bias limited to the topk_group groups (E split into n_group contiguous groups, a group
    scored by the sum of its top-2 biased scores); weights = the unbiased s of the chosen experts, renormalised
    to sum 1 (when k > 1), times scale."""
    T, E = logits.shape
    s = torch.sigmoid(logits.float())  # [T, E]
    biased = s + bias.float()  # [T, E]
    group_score = biased.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)  # [T, G]
    keep = torch.topk(group_score, topk_group, dim=-1).indices  # [T, g]
    group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, keep, True)  # [T, G]
    allowed = group_mask[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)  # [T, E]
    ids = torch.topk(biased.masked_fill(~allowed, float("-inf")), top_k, dim=-1).indices  # [T, k]
    w = s.gather(1, ids)  # [T, k]
    if top_k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale, ids


# ------------------------------------------------------------------------------------------------------------------
# Triton path

def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (sorted_ids [P] int32, block_expert [P / block_m] int32, num_padded [1] int32).

    sorted_ids lists the flat assignment indices (t * k + slot) grouped by expert, each expert's run padded with
    the sentinel T*k to a multiple of block_m; block_expert is the expert of each block_m tile (num_experts past
    the end); num_padded is the used length. P = T*k + min(E, T*k) * (block_m - 1) rounded up to block_m is a
    host-known bound, so nothing here waits for the device."""
    flat = ids.reshape(-1)  # [N]
    n, dev = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).index_add_(0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    pad_end = torch.cumsum(padded, 0)  # [E]
    run_start = torch.cumsum(counts, 0) - counts  # [E]
    order = torch.argsort(flat, stable=True)  # [N]
    e_sorted = flat[order]  # [N]
    dest = pad_end[e_sorted] - padded[e_sorted] + torch.arange(n, device=dev) - run_start[e_sorted]  # [N]
    bound = triton.cdiv(n + min(num_experts, n) * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((bound,), n, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(0, bound, block_m, device=dev)  # [P / BM]
    block_expert = torch.searchsorted(pad_end, block_start, right=True).to(torch.int32)
    return sorted_ids, block_expert, pad_end[-1:].to(torch.int32)


@triton.jit
def _moe_gemm_kernel(
    # pointers
    A, W1, W2, Out, SortedIds, BlockExpert, NumPadded, RouteW,
    # sizes
    n_out, k_dim, num_valid, a_div,
    # strides
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    # meta-parameters
    GATED: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Out[id] = f(A[id // a_div] @ W[e].T) for the ids of one padded tile of expert e.
    GATED: f = silu(A W1^T) * (A W2^T); WEIGHTED: times RouteW[id]."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(n_out, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    if pid_m * BLOCK_M >= tl.load(NumPadded):
        return
    ids = tl.load(SortedIds + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM] assignment indices
    valid = ids < num_valid
    expert = tl.load(BlockExpert + pid_m).to(tl.int64)
    a_rows = ids // a_div
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < n_out
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_base = expert * stride_we + offs_n[None, :] * stride_wn
    for k0 in range(0, k_dim, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < k_dim
        a = tl.load(A + a_rows[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=valid[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        if UPCAST:
            a = a.to(tl.float32)
        w_mask = n_mask[None, :] & k_mask[:, None]
        w1 = tl.load(W1 + w_base + kk[:, None] * stride_wk, mask=w_mask, other=0.0).to(a.dtype)  # [BK, BN]
        acc1 += tl.dot(a, w1, input_precision=PRECISION)
        if GATED:
            w2 = tl.load(W2 + w_base + kk[:, None] * stride_wk, mask=w_mask, other=0.0).to(a.dtype)
            acc2 += tl.dot(a, w2, input_precision=PRECISION)
    if GATED:
        acc1 = acc1 * tl.sigmoid(acc1) * acc2
    if WEIGHTED:
        acc1 = acc1 * tl.load(RouteW + ids, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(Out + ids[:, None] * stride_om + offs_n[None, :] * stride_on, acc1.to(Out.dtype.element_ty),
             mask=valid[:, None] & n_mask[None, :])


def _config(num_assign: int, num_experts: int) -> dict[str, int]:
    """Default tiles (no tuned table yet): small M tiles when experts get few tokens each (block passes)."""
    per_expert = num_assign / max(num_experts, 1)
    block_m = 16 if per_expert <= 16 else (32 if per_expert <= 64 else 64)
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32 if block_m < 64 else 64, num_warps=4)


def _gemm(a: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor | None, out: torch.Tensor, sorted_ids: torch.Tensor,
          block_expert: torch.Tensor, num_padded: torch.Tensor, route_w: torch.Tensor | None, a_div: int,
          cfg: dict[str, int]) -> None:
    E, n_out, k_dim = w1.shape
    precision, upcast = dot_settings(a.dtype)
    grid = (block_expert.shape[0] * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    _moe_gemm_kernel[grid](
        a, w1, w1 if w2 is None else w2, out, sorted_ids, block_expert, num_padded,
        out if route_w is None else route_w,
        n_out, k_dim, out.shape[0], a_div,
        a.stride(0), a.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), out.stride(0), out.stride(1),
        GATED=w2 is not None, WEIGHTED=route_w is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], PRECISION=precision, UPCAST=upcast,
        num_warps=cfg["num_warps"])


def fused_moe_triton(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                     weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """moe_ref's contract on the Triton grouped GEMMs. No host sync."""
    T, k = ids.shape
    E, inter, D = w_gate.shape
    assert x.shape == (T, D) and w_up.shape == w_gate.shape and w_down.shape == (E, D, inter)
    if T == 0:
        return torch.zeros_like(x)
    cfg = _config(T * k, E)
    sorted_ids, block_expert, num_padded = align_by_expert(ids, E, cfg["BLOCK_M"])
    h = torch.empty(T * k, inter, dtype=x.dtype, device=x.device)  # [T*k, I] by assignment index
    _gemm(x, w_gate, w_up, h, sorted_ids, block_expert, num_padded, None, k, cfg)
    y = torch.empty(T * k, D, dtype=x.dtype, device=x.device)  # [T*k, D]
    _gemm(h, w_down, None, y, sorted_ids, block_expert, num_padded, weights.reshape(-1).contiguous(), 1, cfg)
    return y.view(T, k, D).sum(1, dtype=torch.float32).to(x.dtype)
