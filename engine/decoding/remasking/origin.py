"""origin (Dream's default `alg`): every masked position is revealed independently with probability
1 - t[s+1]/t[s] (t = linspace(1, eps, steps + 1)), the last step revealing all; revealed positions take their
candidate token. The score (p(x0)) is unused: this rule brings its own transfer rule, `origin`, which replaces the
algorithm's schedule (so it needs algorithm='dream' and cannot be combined with threshold or factor)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import noise
from ..candidates import ScoreStats
from ..registry import Remasking, Transfer, register_remasking, register_transfer
from ..transfer.dream import dream_ratio

if TYPE_CHECKING:
    from ...sequence import Sequence
    from ..select import SelectContext


def score(stats: ScoreStats) -> tuple[torch.Tensor, torch.Tensor]:
    return stats.p_x0, stats.p_x0


def reveal_prob(seq: "Sequence") -> float:
    """The probability that each masked position is revealed this step."""
    if seq.step_in_block >= seq.block_steps - 1:
        return 1.0
    return float(dream_ratio(seq.block_steps, seq.params.eps, seq.step_in_block))


def select(ctx: "SelectContext", prob: torch.Tensor, _: float) -> torch.Tensor:
    u = noise.uniform(ctx.noise_keys ^ noise.STREAM_ORIGIN)  # [B, M]
    return ctx.selectable & (u < prob[:, None])


register_remasking(Remasking("origin", score, "Dream: reveal each position at random with the schedule's "
                             "probability", transfer="origin", algorithm="dream", why="is Dream's algorithm",
                             transfer_why="reveals positions at random",
                             order=4))
register_transfer(Transfer("origin", reveal_prob, select, "each masked position revealed with probability "
                           "1 - t[s+1]/t[s]", kind="remasking"))
