"""Building blocks of the transformer: RMSNorm, (partial) RoPE, attention block, SwiGLU MLP, MoE (softmax router,
or LLaDA2's sigmoid group-limited router with shared experts)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import AttnContext, attention
from .parallel import SINGLE, Shard, shard_range


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back to x's dtype, then scale (the HF/LLaDA order)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Rotary(nn.Module):
    """Rotate-half (NeoX) RoPE computed in fp32 from a cos/sin table grown on demand."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.theta = theta
        # on the CPU even when built on the meta device (reset() recomputes it after loading): arithmetic on meta
        # tensors goes through torch._refs, which imports torch._dynamo (~1.6 s CPU of every start-up)
        steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()  # [D/2]
        inv_freq = 1.0 / (theta ** (steps / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2]
        self.register_buffer("cos", torch.empty(0, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(0, head_dim), persistent=False)

    def reset(self) -> None:
        """Recompute inv_freq (after the module was built on the meta device) and drop the table."""
        head_dim = self.cos.shape[1]
        dev = self.inv_freq.device if self.inv_freq.device.type != "meta" else torch.device("cpu")
        self.inv_freq = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=dev).float() / head_dim))
        self.cos = torch.empty(0, head_dim, device=dev)
        self.sin = torch.empty(0, head_dim, device=dev)

    def _grow(self, n: int) -> None:
        n = max(n, 2 * self.cos.shape[0], 256)
        t = torch.arange(n, device=self.inv_freq.device, dtype=torch.int64).float()
        freqs = torch.outer(t, self.inv_freq)  # [n, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [n, D]
        self.cos, self.sin = emb.cos(), emb.sin()

    def table(self, positions: torch.Tensor, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, D] fp32. max_pos bounds positions (known host-side, no sync)."""
        if max_pos >= self.cos.shape[0]:
            self._grow(max_pos + 1)
        return self.cos[positions][:, None, :], self.sin[positions][:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; rotate-half pairing (i, i + R/2) over the first R = cos.shape[-1] dims (partial rotary: the
    remaining D - R dims pass through)."""
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :rd], cos, sin), x[..., rd:]], dim=-1)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Heads split over ranks: q/k/v column-parallel (this rank's heads), o_proj row-parallel + all-reduce."""

    def __init__(self, cfg: ModelConfig, layer: int, shard: Shard = SINGLE) -> None:
        super().__init__()
        self.layer, self.cfg, self.shard = layer, cfg, shard
        d, hd = cfg.hidden_size, cfg.head_dim
        h0, h1 = shard.heads(cfg.num_heads)
        k0, k1 = shard.kv_heads(cfg.num_kv_heads)
        self.num_heads, self.num_kv_heads = h1 - h0, k1 - k0
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.qkv_proj: nn.Linear | None = None
        """q/k/v as one GEMM (engine/model/fuse.py, at load time on CUDA); q/k/v_proj are then None."""
        if cfg.fused_qkv:  # the checkpoint's own fused layout (LLaDA2 query_key_value)
            self.qkv_proj = nn.Linear(d, (self.num_heads + 2 * self.num_kv_heads) * hd, bias=cfg.qkv_bias)
            self.q_proj = self.k_proj = self.v_proj = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttnContext) -> torch.Tensor:
        cfg = self.cfg
        T = x.shape[0]
        hd, h, hkv = cfg.head_dim, self.num_heads, self.num_kv_heads  # this rank's heads
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([h * hd, hkv * hd, hkv * hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(T, h, hd)  # [T, H, D]
        k = k.view(T, hkv, hd)  # [T, Hkv, D]
        v = v.view(T, hkv, hd)  # [T, Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = attention(q, k, v, ctx, self.layer, cfg.head_dim ** -0.5)  # [T, H, D]
        return self.shard.all_reduce(self.o_proj(out.reshape(T, self.num_heads * cfg.head_dim)))


class MLP(nn.Module):
    """SwiGLU; gate/up column-parallel, down row-parallel + all-reduce."""

    def __init__(self, d: int, inter: int, shard: Shard = SINGLE) -> None:
        super().__init__()
        i0, i1 = shard_range(inter, shard.rank, shard.size)
        self.shard = shard
        self.gate_proj = nn.Linear(d, i1 - i0, bias=False)
        self.up_proj = nn.Linear(d, i1 - i0, bias=False)
        self.down_proj = nn.Linear(i1 - i0, d, bias=False)
        self.gate_up_proj: nn.Linear | None = None
        """gate and up as one GEMM (engine/model/fuse.py); gate/up_proj are then None."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shard.all_reduce(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output (summed over ranks by forward's all-reduce)."""
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class MoE(nn.Module):
    """Softmax top-k routed SwiGLU experts; expert weights stacked as [E, I, D] / [E, D, I].

    Sharded: the router is replicated (every rank routes every token); each rank holds either every expert's slice
    of the intermediate size (tensor parallel) or whole experts [e0, e1) (expert parallel), and its partial output
    is combined by one all-reduce. Shared experts (LLaDA2) are sliced by their intermediate size on every rank
    and their partial output joins the same all-reduce. In one process they can instead run inside the grouped
    GEMM as extra experts every token is routed to with weight 1 (engine/model/fuse.py: num_fused_shared)."""

    def __init__(self, cfg: ModelConfig, shard: Shard = SINGLE) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.shard = shard
        self.e0, e1 = shard.experts(cfg.num_experts)
        i0, i1 = shard.moe_inter(cfg.moe_intermediate_size)
        e, i = e1 - self.e0, i1 - i0
        self.cfg = cfg
        self.top_k, self.norm_topk = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.router = nn.Linear(d, cfg.num_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(e, i, d))
        self.w_up = nn.Parameter(torch.empty(e, i, d))
        self.w_down = nn.Parameter(torch.empty(e, d, i))
        grouped = cfg.router == "sigmoid_group"
        self.expert_bias = nn.Parameter(torch.zeros(cfg.num_experts)) if grouped else None
        """[E] added to the sigmoid scores for expert selection only (LLaDA2)."""
        self.shared = MLP(d, cfg.shared_expert_size, shard) if cfg.shared_expert_size else None
        """Shared experts: one SwiGLU added unweighted to the routed output (LLaDA2)."""
        self.num_fused_shared = 0
        """Shared-expert chunks stacked after the routed experts in w_gate/w_up/w_down (fuse.py); shared is then
        None."""

    def route(self, x: torch.Tensor, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> weights [T, k] (x.dtype), expert ids [T, k]."""
        from kernels.moe import route, route_grouped, route_grouped_triton
        if self.expert_bias is not None:  # router GEMM in fp32, as the reference
            c = self.cfg
            logits = F.linear(x.float(), self.router.weight.float())  # [T, E]
            grouped = route_grouped_triton if backend == "triton" else route_grouped
            weights, ids = grouped(logits, self.expert_bias, self.top_k, c.n_group, c.topk_group,
                                   c.routed_scaling_factor)
        else:
            weights, ids = route(self.router(x), self.top_k, self.norm_topk)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        out = self._routed(x, backend)  # this rank's partial sum
        if self.shared is not None:
            out = out + self.shared.partial(x)
        return self.shard.all_reduce(out)

    def _routed(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        """The routed experts' output on this rank (not yet summed over ranks)."""
        from kernels.moe import append_shared, fused_moe, fused_moe_triton
        from .moe_cpu import moe_cpu
        weights, ids = self.route(x, backend)
        run = fused_moe_triton if backend == "triton" else (moe_cpu if x.device.type == "cpu" else fused_moe)
        if not self.shard.expert_parallel or not self.shard.active:
            if self.num_fused_shared:
                n = self.num_fused_shared
                weights, ids = append_shared(weights, ids, self.w_gate.shape[0] - n, n)
            return run(x, self.w_gate, self.w_up, self.w_down, weights, ids)
        # expert parallel: only the (token, slot) pairs routed to this rank's experts, one slot each
        local = ids - self.e0  # [T, k]
        pair = torch.nonzero((local >= 0) & (local < self.w_gate.shape[0]))  # [P, 2] (token, slot)
        tok, slot = pair[:, 0], pair[:, 1]
        out = torch.zeros_like(x)
        if tok.numel():
            y = run(x[tok], self.w_gate, self.w_up, self.w_down, weights[tok, slot, None],
                    local[tok, slot, None])  # [P, D]
            out.index_add_(0, tok, y)
        return out
