"""random: commit positions in a uniformly random order (LLaDA's `random` remasking); the draw is the position's
counter-based noise, so it is reproducible per seed and independent of the batch."""
from __future__ import annotations

import torch

from ..candidates import ScoreStats
from ..registry import Remasking, register_remasking


def score(stats: ScoreStats) -> tuple[torch.Tensor, torch.Tensor]:
    u = stats.uniform  # [N] in (0, 1)
    return u, u


register_remasking(Remasking("random", score, "a uniformly random order", order=1))
