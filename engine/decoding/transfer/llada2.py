"""llada2 (LLaDA2's block diffusion, LLaDA2MoeModelLM.generate): each step of a block has a quota q (the block
length split over its steps, engine/block_diffusion.quota); the positions whose confidence is strictly above the
threshold are committed when there are at least q of them (all of them, even more than q), else the top-q."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ... import block_diffusion
from ..registry import Transfer, register_transfer
from ..select import top_count

if TYPE_CHECKING:
    from ...sequence import Sequence
    from ..select import SelectContext


def quota(seq: "Sequence") -> float:
    return block_diffusion.quota(seq.params.block_length, seq.block_steps, seq.step_in_block)


def select(ctx: "SelectContext", q: torch.Tensor, max_q: float) -> torch.Tensor:
    top = top_count(ctx, q, max_q)  # [B, M]
    if ctx.threshold is None:
        return top
    strict = (ctx.conf > ctx.threshold[:, None]) & ctx.selectable  # [B, M] (nan threshold: none)
    enough = strict.sum(1) >= q  # [B]
    return torch.where(enough[:, None], strict, top)


register_transfer(Transfer("llada2", quota, select, "block diffusion: the positions strictly above threshold when "
                           "at least the step's quota, else the top-quota (block-causal models only)",
                           adaptive=True, tempered_scores=True, order=3))
