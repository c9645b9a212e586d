"""threshold (Fast-dLLM parallel decoding): commit every selectable position of the block whose confidence is
>= threshold, and always the top-scored one. On when SamplingParams.threshold is set."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..registry import Transfer, register_transfer

if TYPE_CHECKING:
    from ...sequence import Sequence
    from ..select import SelectContext


def value(seq: "Sequence") -> float:
    return seq.params.threshold


def select(ctx: "SelectContext", threshold: torch.Tensor, _: float) -> torch.Tensor:
    return ((ctx.conf >= threshold[:, None]) & ctx.selectable | ctx.top1) & ctx.selectable  # [B, M]


register_transfer(Transfer("threshold", value, select, "commit every position with confidence >= threshold",
                           kind="param", adaptive=True, order=10))
