"""The one bidirectional transformer that covers every supported family."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import AttnContext
from .layers import MLP, Attention, MoE, RMSNorm, Rotary


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.moe_layers[layer]:
            self.moe, self.mlp = MoE(cfg), None
        else:
            self.moe, self.mlp = None, MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttnContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, ctx)
        h = self.mlp_norm(x)
        return x + (self.moe(h, ctx.backend) if self.moe is not None else self.mlp(h))


class Transformer(nn.Module):
    """forward(input_ids [T], positions [T], ctx) -> final-normed hidden [T, D]; compute_logits(h) -> [N, V] fp32."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttnContext,
                max_pos: int | None = None) -> torch.Tensor:
        if max_pos is None:
            max_pos = int(positions.max()) if positions.numel() else 0
        rope = self.rotary.table(positions, max_pos)
        x = self.embed(input_ids)  # [T, D]
        for block in self.layers:
            x = block(x, rope, ctx)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> logits [N, V] float32."""
        return self.lm_head(hidden).float()
