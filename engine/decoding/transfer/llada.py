"""llada: the block's m masked positions split evenly over its S steps, the first (m mod S) steps one more
(LLaDA's get_num_transfer_tokens); each step commits the top-scored ones."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..registry import Transfer, register_transfer
from ..select import top_count

if TYPE_CHECKING:
    from ...sequence import Sequence


def llada_count(block_masks: int, steps: int, step: int) -> int:
    base, rem = divmod(block_masks, steps)
    return base + (1 if step < rem else 0)


def count(seq: "Sequence") -> float:
    return llada_count(seq.block_masks, seq.block_steps, seq.step_in_block)


register_transfer(Transfer("llada", count, top_count, "even split of each block's masks over its steps", order=0))
