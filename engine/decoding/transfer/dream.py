"""dream: commit int(masked * (1 - t[s+1]/t[s])) of the still-masked positions, t = linspace(1, eps, S + 1) in
float32 as Dream's reference; the last step commits all. Scores come from the tempered logits."""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from ..registry import Transfer, register_transfer
from ..select import top_count

if TYPE_CHECKING:
    from ...sequence import Sequence


@lru_cache(maxsize=64)
def dream_ratios(steps: int, eps: float) -> torch.Tensor:
    """[steps] float32 1 - t[s+1]/t[s] over t = linspace(1, eps, steps + 1), as the reference computes it. Built
    once per (steps, eps), not per request per step (steps is bounded by SamplingParams' MAX_STEPS)."""
    t = torch.linspace(1, eps, steps + 1)  # float32, as the reference
    return 1 - t[1:] / t[:-1]


def dream_ratio(steps: int, eps: float, step: int) -> torch.Tensor:
    return dream_ratios(steps, eps)[step]


def dream_count(masked_now: int, steps: int, step: int, eps: float) -> int:
    if step >= steps - 1:
        return masked_now
    return int(torch.tensor(float(masked_now)) * dream_ratio(steps, eps, step))


def count(seq: "Sequence") -> float:
    return dream_count(seq.masked_in_block, seq.block_steps, seq.step_in_block, seq.params.eps)


register_transfer(Transfer("dream", count, top_count, "1 - s/t of the remaining masks per step",
                           tempered_scores=True, order=1))
