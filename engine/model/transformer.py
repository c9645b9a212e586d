"""The one transformer that covers every supported family (bidirectional, or block-causal for LLaDA2: the mask
comes with the attention context, see attention.py)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import AttnContext
from .layers import MLP, Attention, MoE, RMSNorm, Rotary
from .parallel import SINGLE, Shard


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, shard: Shard = SINGLE) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer, shard)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.moe_layers[layer]:
            self.moe, self.mlp = MoE(cfg, shard), None
        else:
            self.moe, self.mlp = None, MLP(cfg.hidden_size, cfg.intermediate_size, shard)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttnContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, ctx)
        h = self.mlp_norm(x)
        return x + (self.moe(h, ctx.backend) if self.moe is not None else self.mlp(h))


class Transformer(nn.Module):
    """forward(input_ids [T], positions [T], ctx) -> final-normed hidden [T, D]; compute_logits(h) -> [N, V] fp32.

    With a Shard of size > 1 the embedding and lm_head hold this rank's vocabulary rows (equal chunks of
    ceil(V / size), zero-padded) and compute_logits gathers the full logits to rank 0 (other ranks get None)."""

    def __init__(self, cfg: ModelConfig, shard: Shard = SINGLE) -> None:
        super().__init__()
        self.cfg, self.shard = cfg, shard
        rows = shard.vocab_chunk(cfg.vocab_size)
        self.vocab_start = shard.vocab(cfg.vocab_size)[0]
        weight = torch.empty(rows, cfg.hidden_size)  # [V, D]
        if weight.device.type != "meta":  # built on the meta device (the loader) it is not initialised: normal_
            nn.init.normal_(weight)  # there imports torch._dynamo (~1.6 s CPU of every start-up)
        self.embed = nn.Embedding(rows, cfg.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(Block(cfg, i, shard) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, rows, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = Rotary(cfg.rotary_dim or cfg.head_dim, cfg.rope_theta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttnContext,
                max_pos: int | None = None) -> torch.Tensor:
        if max_pos is None:
            max_pos = int(positions.max()) if positions.numel() else 0
        rope = self.rotary.table(positions, max_pos)
        x = self._embed(input_ids)  # [T, D]
        for block in self.layers:
            x = block(x, rope, ctx)
        return self.norm(x)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.shard.active:
            return self.embed(input_ids)
        local = input_ids - self.vocab_start  # [T]
        mine = (local >= 0) & (local < self.embed.num_embeddings)
        x = self.embed(torch.where(mine, local, 0)) * mine[:, None].to(self.embed.weight.dtype)  # [T, D]
        return self.shard.all_reduce(x)

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> [N, Vc] float32: this rank's vocabulary columns (all of them for one rank; sharded:
        columns [vocab_start, vocab_start + Vc), zero past the vocabulary in the last chunk)."""
        return self.lm_head(hidden).float()

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor | None:
        """Every rank's local_logits -> the full [N, V] on rank 0 (None on the other ranks)."""
        if not self.shard.active:
            return local
        parts = self.gather_to_rank0(local)
        return None if parts is None else torch.cat(parts, dim=-1)[:, :self.cfg.vocab_size]

    def gather_to_rank0(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Each rank's same-shape x -> the list of them on rank 0 (rank order), None elsewhere."""
        if not self.shard.active:
            return [x]
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(self.shard.size)] if self.shard.rank == 0 else None
        dist.gather(x.contiguous(), parts, dst=_group_rank0(self.shard), group=self.shard.group)
        return parts

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, D] -> logits [N, V] float32 (sharded: on rank 0; None on the other ranks)."""
        return self.gather_logits(self.local_logits(hidden))


def _group_rank0(shard: Shard) -> int:
    """Global rank of the group's rank 0 (gather's dst is a global rank)."""
    import torch.distributed as dist
    return 0 if shard.group is None else dist.get_global_rank(shard.group, 0)
