"""factor (Fast-dLLM's factor rule): over the confidences sorted c_1 >= c_2 >= ..., commit the largest n with
(n + 1)(1 - c_n) < factor (at least one). On when SamplingParams.factor is set."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..registry import Transfer, register_transfer
from ..select import rank_mask

if TYPE_CHECKING:
    from ...sequence import Sequence
    from ..select import SelectContext


def value(seq: "Sequence") -> float:
    return seq.params.factor


def select(ctx: "SelectContext", factor: torch.Tensor, _: float) -> torch.Tensor:
    B, M = ctx.ranked.shape
    order = torch.sort(ctx.ranked, dim=-1, descending=True, stable=True).indices  # [B, M]
    c = ctx.conf.gather(1, order)  # [B, M] best-first
    valid = ctx.selectable.gather(1, order)
    n = torch.arange(1, M + 1, device=c.device, dtype=torch.float64)[None, :]
    ok = ((n + 1) * (1 - c) < factor[:, None]) & valid
    best = torch.where(ok, n, torch.zeros_like(n)).amax(-1).long().clamp_min(1)  # [B]
    return rank_mask(order, best, M) & ctx.selectable


register_transfer(Transfer("factor", value, select, "commit the largest n with (n+1)(1-c_n) < factor",
                           kind="param", adaptive=True, order=11))
