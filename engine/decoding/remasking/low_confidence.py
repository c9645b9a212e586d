"""low_confidence (LLaDA's default; Dream's maskgit_plus): commit the positions whose candidate is most likely."""
from __future__ import annotations

import torch

from ..candidates import ScoreStats
from ..registry import Remasking, register_remasking


def score(stats: ScoreStats) -> tuple[torch.Tensor, torch.Tensor]:
    return stats.p_x0, stats.p_x0  # [N], already a probability


register_remasking(Remasking("low_confidence", score, "highest p(x0) first", aliases=("maskgit_plus",), order=0))
