"""llada2.1-edit: LLaDA2.1's token editing (T2T refinement) on block diffusion, per request.

The published variants differ (shared/notes/llada2.md). This one follows diffusers' LLaDA2Pipeline /
BlockRefinementScheduler (editing_threshold, max_post_steps), restricted to the current block:
- every step of a block scores every generated position of the block (masked or not; prompt positions never);
- masked positions are filled by the block's transfer rule (llada2: quota + strict threshold, transfer/llada2.py);
- a committed position of the block is replaced by the candidate when the candidate differs from it and its
  confidence is strictly above editing_threshold (in the same step as the fills);
- the block runs its fill steps while masks remain, then post steps while they still edit, at most
  max_post_steps + 1 of them (`advance`); a block filled by its last scheduled step ends there;
- finished blocks are never edited again (block-causal: their K/V stays exact, and streaming per finished block
  stays final).
Turned on by `editing_threshold` (or `editing="llada2.1-edit"`, then editing_threshold 0.5 and max_post_steps 16,
the values of diffusers' documented LLaDA2.1 example).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..registry import Editing, register_editing

if TYPE_CHECKING:
    from ...sequence import Sequence
    from . import EditContext


def edits(ctx: "EditContext") -> torch.Tensor:
    """[B, M] bool: committed tokens whose candidate differs with confidence strictly above the threshold."""
    return (ctx.current != ctx.mask_id) & (ctx.x0 != ctx.current) & (ctx.conf > ctx.threshold[:, None])


def advance(seq: "Sequence", committed: int, edited: int) -> bool:
    """Fill steps while masks remain (each may also edit), then post steps while they edit, at most
    max_post_steps + 1 of them; a block whose last mask is filled by its last scheduled step ends there."""
    filling = seq.masked_in_block > 0
    seq.masked_in_block -= committed
    if filling:
        seq.step_in_block += 1
        return seq.step_in_block >= seq.block_steps
    seq.post_steps += 1
    return edited == 0 or seq.post_steps > seq.params.max_post_steps


register_editing(Editing(
    "llada2.1-edit", edits, advance, "LLaDA2.1 token editing: each step of a block also replaces committed tokens "
    "of the block predicted otherwise with confidence > editing_threshold; post steps while they edit "
    "(max_post_steps)", fields=("editing_threshold", "max_post_steps"),
    defaults=(("editing_threshold", 0.5), ("max_post_steps", 16)), algorithm="llada2",
    why="is LLaDA2.1's: it needs a block-diffusion model", order=0))
