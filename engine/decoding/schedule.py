"""Fixed transfer schedules: how many masked positions of the current block one step commits.

- llada: the block's m masks split evenly over its S steps, the first (m mod S) steps one more (get_num_transfer_tokens).
- dream: int(masked * (1 - s/t)) with t = linspace(1, eps, S + 1) in float32; the last step commits all.
- llada2: the quota of the full block length (engine/block_diffusion.py), with the strict threshold rule.
- rnd1: with M masks at block start, step j of S leaves floor(M * (S - j) / S) masked (the highest-entropy
  ones); the last step commits all.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from .. import block_diffusion

if TYPE_CHECKING:
    from ..sequence import Sequence


def llada_count(block_masks: int, steps: int, step: int) -> int:
    base, rem = divmod(block_masks, steps)
    return base + (1 if step < rem else 0)


@lru_cache(maxsize=64)
def _dream_ratios(steps: int, eps: float) -> torch.Tensor:
    """[steps] float32 1 - t[s+1]/t[s] over t = linspace(1, eps, steps + 1), as the reference computes it. Built
    once per (steps, eps), not per request per step (steps is bounded by SamplingParams' MAX_STEPS)."""
    t = torch.linspace(1, eps, steps + 1)  # float32, as the reference
    return 1 - t[1:] / t[:-1]


def dream_count(masked_now: int, steps: int, step: int, eps: float) -> int:
    if step >= steps - 1:
        return masked_now
    return int(torch.tensor(float(masked_now)) * _dream_ratios(steps, eps)[step])


def dream_origin_prob(steps: int, step: int, eps: float) -> float:
    if step >= steps - 1:
        return 1.0
    return float(_dream_ratios(steps, eps)[step])


def rnd1_count(block_masks: int, masked_now: int, steps: int, step: int) -> int:
    if step >= steps - 1:
        return masked_now
    keep = int(torch.tensor(block_masks) * ((steps - 1 - step) / steps))
    return max(masked_now - keep, 0)


def fixed_count(seq: "Sequence") -> int:
    """Positions this step of seq commits under its fixed schedule; -1 when another rule decides."""
    p = seq.params
    if p.algorithm == "llada2":  # the quota; the strict threshold may commit more (decoding/select.py)
        return block_diffusion.quota(p.block_length, seq.block_steps, seq.step_in_block)
    if p.adaptive or p.remasking == "origin":
        return -1
    if p.algorithm == "dream":
        return dream_count(seq.masked_in_block, seq.block_steps, seq.step_in_block, p.eps)
    if p.algorithm == "rnd1":
        return rnd1_count(seq.block_masks, seq.masked_in_block, seq.block_steps, seq.step_in_block)
    return llada_count(seq.block_masks, seq.block_steps, seq.step_in_block)


def origin_prob(seq: "Sequence") -> float | None:
    """Dream 'origin': the probability that each masked position is revealed this step."""
    if seq.params.remasking != "origin":
        return None
    return dream_origin_prob(seq.block_steps, seq.step_in_block, seq.params.eps)
