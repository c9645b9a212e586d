"""Token editing ("llada2.1-edit"): LLaDA2.1's T2T refinement on block diffusion, per request.

The published variants differ (shared/notes/llada2.md). This one follows diffusers' LLaDA2Pipeline /
BlockRefinementScheduler (editing_threshold, max_post_steps), restricted to the current block:
- every step of a block scores every generated position of the block (masked or not; prompt positions never);
- masked positions are filled by the llada2 rule (quota + strict threshold, decoding/select.py);
- a committed position of the block is replaced by the candidate when the candidate differs from it and its
  confidence is strictly above editing_threshold (in the same step as the fills);
- the block runs its fill steps while masks remain, then post steps while they still edit, at most
  max_post_steps + 1 of them (Sequence._advance_editing); a block filled by its last scheduled step ends there;
- finished blocks are never edited again (block-causal: their K/V stays exact, and streaming per finished block
  stays final).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..sequence import Sequence


def decoded_count(seq: "Sequence") -> int:
    """Positions of seq's current block scored this step: its masked positions, or with editing every generated
    position of the block."""
    if not seq.params.editing:
        return seq.masked_in_block
    bs, be = seq.block_bounds()
    return be - max(bs, seq.prompt_len)


def editable_positions(block_pos: torch.Tensor, block_seq: torch.Tensor, edit_from: torch.Tensor) -> torch.Tensor:
    """block_pos [Nb] canvas positions of the scheduled blocks, block_seq [Nb] their request, edit_from [B] the
    first editable position per request (a huge value for requests without editing) -> [Nb] bool."""
    return block_pos >= edit_from[block_seq]


def edits(current: torch.Tensor, x0: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor,
          editing_threshold: torch.Tensor, mask_id: int) -> torch.Tensor:
    """current/x0 [B, M] long, conf [B, M] float64, valid [B, M] bool, editing_threshold [B] float64 (nan: off)
    -> [B, M] bool: committed tokens to replace by their candidate."""
    return valid & (current != mask_id) & (x0 != current) & (conf > editing_threshold[:, None])
