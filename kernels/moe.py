"""Mixture-of-experts SwiGLU dispatch.

`moe_ref` is the obviously-correct loop over (token, slot) pairs grouped by expert; `fused_moe` is the torch path
the model calls on CPU (tokens sorted by expert, one GEMM pair per expert that received tokens).

`fused_moe_triton` is the GPU path, vLLM's fused-MoE recipe: the T*k (token, slot) assignments are sorted by
expert and each expert's run padded to the M tile, all on device (`align_by_expert`, no host sync: every size the
launch needs is an upper bound known on the host) -> one grouped GEMM over the padded runs computes gate and up
for a tile with SiLU(gate)*up fused in its epilogue -> a second grouped GEMM computes down with the routing weight
fused -> the k slots of each token are summed in fp32.

LLaDA2 / Bailing-MoE-V2 routing (`route_grouped`, torch; `route_grouped_triton`, one program per token): sigmoid
scores in fp32, selection on the scores plus a per-expert bias with group-limited top-k (experts in n_group
contiguous groups, a group's score is the sum of its two best biased scores, only the topk_group best groups
compete), weights = the UNBIASED scores of the chosen experts renormalised (top_k > 1) times routed_scaling_factor.
Shared experts join the same grouped GEMMs as extra experts every token is routed to with weight 1
(`append_shared`): a shared SwiGLU of width n * I is n experts of width I, since down(silu(gate x) * up x) sums
over its intermediate columns (`split_shared` cuts it so at load time).
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


def route_grouped(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                  scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] + expert bias [E] -> weights [T, k] fp32, expert ids [T, k] (LLaDA2's gate)."""
    T, E = logits.shape
    _check_groups(E, top_k, n_group, topk_group)
    scores = torch.sigmoid(logits.float())  # [T, E]
    biased = scores + bias.float()  # [T, E] used for selection only
    group_score = biased.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)  # [T, G]
    groups = torch.topk(group_score, topk_group, dim=-1).indices  # [T, Gk]
    keep = torch.zeros(T, n_group, dtype=torch.bool, device=logits.device).scatter_(1, groups, True)  # [T, G]
    keep = keep[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)  # [T, E]
    ids = torch.topk(biased.masked_fill(~keep, float("-inf")), top_k, dim=-1).indices  # [T, k]
    weights = scores.gather(1, ids)  # [T, k]
    if top_k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * scaling, ids


def _check_groups(E: int, top_k: int, n_group: int, topk_group: int) -> None:
    if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"group-limited routing needs n_group dividing num_experts and 1 <= topk_group <= n_group "
                         f"(num_experts={E}, n_group={n_group}, topk_group={topk_group})")
    if E // n_group < 2:
        raise ValueError(f"group-limited routing scores a group by its two best experts: num_experts / n_group must "
                         f"be >= 2 (num_experts={E}, n_group={n_group})")
    if not 1 <= top_k <= topk_group * (E // n_group):
        raise ValueError(f"top_k {top_k} must be in [1, topk_group * experts per group = "
                         f"{topk_group * (E // n_group)}]")


def append_shared(weights: torch.Tensor, ids: torch.Tensor, first_shared: int, num_shared: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """weights/ids [T, k] -> [T, k + num_shared]: every token also goes to experts first_shared ..
    first_shared + num_shared - 1 (the shared experts' chunks stacked after the routed ones) with weight 1."""
    T = ids.shape[0]
    extra = torch.arange(first_shared, first_shared + num_shared, dtype=ids.dtype, device=ids.device)
    return (torch.cat([weights, weights.new_ones(T, num_shared)], 1),
            torch.cat([ids, extra.expand(T, num_shared)], 1))


def split_shared(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, width: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A shared SwiGLU gate/up [n * I, D], down [D, n * I] -> n experts of width I = `width`:
    gate/up [n, I, D], down [n, D, I] (their outputs summed equal the shared expert's)."""
    if gate.shape[0] % width:
        raise ValueError(f"shared expert width {gate.shape[0]} is not a multiple of the expert width {width}")
    n = gate.shape[0] // width
    return (gate.reshape(n, width, -1), up.reshape(n, width, -1),
            down.reshape(down.shape[0], n, width).permute(1, 0, 2).contiguous())


# ------------------------------------------------------------------------------------------------------------------
# Triton path

@triton.jit
def _route_grouped_kernel(
    Logits, Bias, WOut, IdOut,
    num_experts, per_group, stride_l, scaling,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr, G_PAD: tl.constexpr,
    EPG_PAD: tl.constexpr, K_PAD: tl.constexpr, RENORM: tl.constexpr,
):
    """One token: the experts as a [G_PAD, EPG_PAD] tile (group g, member j = expert g * per_group + j)."""
    t = tl.program_id(0).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    offs_j = tl.arange(0, EPG_PAD)
    valid = (offs_g < N_GROUP)[:, None] & (offs_j < per_group)[None, :]  # [G, J]
    expert = offs_g[:, None] * per_group + offs_j[None, :]  # [G, J]
    logit = tl.load(Logits + t * stride_l + expert, mask=valid, other=0.0).to(tl.float32)
    score = tl.sigmoid(logit)  # [G, J] unbiased
    biased = tl.where(valid, score + tl.load(Bias + expert, mask=valid, other=0.0).to(tl.float32), float("-inf"))
    # group score: the sum of its two best biased scores
    best = tl.max(biased, 1)  # [G]
    first = tl.argmax(biased, 1)  # [G]
    second = tl.max(tl.where(offs_j[None, :] == first[:, None], float("-inf"), biased), 1)  # [G]
    gscore = tl.where(offs_g < N_GROUP, best + second, float("-inf"))  # [G]
    keep = offs_g < 0  # [G] all False
    for _ in tl.static_range(TOPK_GROUP):
        g = tl.argmax(gscore, 0)
        keep = keep | (offs_g == g)
        gscore = tl.where(offs_g == g, float("-inf"), gscore)
    cand = tl.reshape(tl.where(keep[:, None], biased, float("-inf")), [G_PAD * EPG_PAD])  # [GJ]
    flat_expert = tl.reshape(expert, [G_PAD * EPG_PAD])
    flat_score = tl.reshape(score, [G_PAD * EPG_PAD])
    offs = tl.arange(0, G_PAD * EPG_PAD)
    offs_k = tl.arange(0, K_PAD)
    w = tl.zeros([K_PAD], tl.float32)
    ids = tl.zeros([K_PAD], tl.int64)
    for i in tl.static_range(TOP_K):
        pick = offs == tl.argmax(cand, 0)  # [GJ] one-hot
        w = tl.where(offs_k == i, tl.sum(tl.where(pick, flat_score, 0.0), 0), w)
        ids = tl.where(offs_k == i, tl.sum(tl.where(pick, flat_expert, 0), 0), ids)
        cand = tl.where(pick, float("-inf"), cand)
    if RENORM:
        w = w / tl.sum(w, 0)
    k_mask = offs_k < TOP_K
    tl.store(WOut + t * TOP_K + offs_k, w * scaling, mask=k_mask)
    tl.store(IdOut + t * TOP_K + offs_k, ids, mask=k_mask)


def route_grouped_triton(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                         scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """route_grouped's contract in one launch (one program per token, no host sync)."""
    T, E = logits.shape
    _check_groups(E, top_k, n_group, topk_group)
    assert logits.stride(1) == 1 and bias.shape == (E,)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.long, device=logits.device)
    if T == 0:
        return weights, ids
    per_group = E // n_group
    _route_grouped_kernel[(T,)](
        logits, bias.contiguous(), weights, ids, E, per_group, logits.stride(0), float(scaling),
        N_GROUP=n_group, TOPK_GROUP=topk_group, TOP_K=top_k, G_PAD=triton.next_power_of_2(n_group),
        EPG_PAD=triton.next_power_of_2(per_group), K_PAD=triton.next_power_of_2(top_k), RENORM=top_k > 1,
        num_warps=4 if E >= 128 else 1)
    return weights, ids

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
