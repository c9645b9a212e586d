"""entropy (Dream's, RND1's default): commit the positions whose token distribution has the lowest entropy; the
confidence exp(-H) maps it into (0, 1] for threshold/factor."""
from __future__ import annotations

import torch

from ..candidates import ScoreStats
from ..registry import Remasking, register_remasking


def score(stats: ScoreStats) -> tuple[torch.Tensor, torch.Tensor]:
    neg_h = stats.neg_entropy  # [N] -H
    return neg_h, neg_h.exp()


register_remasking(Remasking("entropy", score, "lowest entropy first", order=3))
