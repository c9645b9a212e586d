"""rnd1: with M masks at block start, step j of S leaves floor(M * (S - j) / S) masked (the lowest-scored ones:
RND1 ranks by entropy); the last step commits all. Scores come from the tempered logits."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..registry import Transfer, register_transfer
from ..select import top_count

if TYPE_CHECKING:
    from ...sequence import Sequence


def rnd1_count(block_masks: int, masked_now: int, steps: int, step: int) -> int:
    if step >= steps - 1:
        return masked_now
    keep = int(torch.tensor(block_masks) * ((steps - 1 - step) / steps))
    return max(masked_now - keep, 0)


def count(seq: "Sequence") -> float:
    return rnd1_count(seq.block_masks, seq.masked_in_block, seq.block_steps, seq.step_in_block)


register_transfer(Transfer("rnd1", count, top_count, "linear schedule of the masks left", tempered_scores=True,
                           order=2))
