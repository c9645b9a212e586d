"""margin (Dream's topk_margin): commit the positions whose two most likely tokens are furthest apart."""
from __future__ import annotations

import torch

from ..candidates import ScoreStats
from ..registry import Remasking, register_remasking


def score(stats: ScoreStats) -> tuple[torch.Tensor, torch.Tensor]:
    return stats.margin, stats.margin  # [N] p1 - p2, in [0, 1]


register_remasking(Remasking("margin", score, "largest top-2 probability margin first", aliases=("topk_margin",),
                             order=2))
