"""Fixed transfer schedules: how many masked positions of the current block one step commits.

- llada: the block's m masks split evenly over its S steps, the first (m mod S) steps one more (get_num_transfer_tokens).
- dream: int(masked * (1 - s/t)) with t = linspace(1, eps, S + 1) in float32; the last step commits all.
- rnd1: with M masks at block start, step j of S leaves floor(M * (S - j) / S) masked (the highest-entropy
  ones); the last step commits all.
"""
from __future__ import annotations

import torch


def llada_count(block_masks: int, steps: int, step: int) -> int:
    base, rem = divmod(block_masks, steps)
    return base + (1 if step < rem else 0)


def dream_count(masked_now: int, steps: int, step: int, eps: float) -> int:
    if step >= steps - 1:
        return masked_now
    t = torch.linspace(1, eps, steps + 1)  # float32, as the reference
    ratio = 1 - t[step + 1] / t[step]
    return int(torch.tensor(float(masked_now)) * ratio)


def dream_origin_prob(steps: int, step: int, eps: float) -> float:
    if step >= steps - 1:
        return 1.0
    t = torch.linspace(1, eps, steps + 1)
    return float(1 - t[step + 1] / t[step])


def rnd1_count(block_masks: int, masked_now: int, steps: int, step: int) -> int:
    if step >= steps - 1:
        return masked_now
    keep = int(torch.tensor(block_masks) * ((steps - 1 - step) / steps))
    return max(masked_now - keep, 0)
