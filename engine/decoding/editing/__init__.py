"""Token-editing rules, one file each: each registers an `Editing` (engine/decoding/registry.py) that may replace
committed tokens of the current block (LLaDA2.1's T2T refinement). Files here are discovered automatically.

Here: the context a rule's device function sees (`EditContext`) and the combiner (`edit`) that runs each rule present
in the batch once over every row and keeps its rows, as decoding/select.py does for transfer rules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import editing_by_id


@dataclass(slots=True)
class EditContext:
    """A step's scored positions of every row, padded [B, M]."""
    current: torch.Tensor  # [B, M] long: the canvas token before this step (mask_id where still masked)
    x0: torch.Tensor  # [B, M] long: the step's candidate
    conf: torch.Tensor  # [B, M] float64 in [0, 1]: the candidate's confidence
    valid: torch.Tensor  # [B, M] bool: a scored position of the row (not padding)
    threshold: torch.Tensor  # [B] float64: the row's editing_threshold (nan: none)
    mask_id: int


def edit(ctx: EditContext, rule: torch.Tensor, host_rules: list[int]) -> torch.Tensor:
    """rule [B] int64 each row's editing rule id (-1: none); host_rules: the same on the host ->
    [B, M] bool, the committed tokens to replace by their candidate."""
    out = torch.zeros_like(ctx.valid)
    for rid in sorted({r for r in host_rules if r >= 0}):  # one vectorised pass per rule in the batch
        out = torch.where((rule == rid)[:, None], editing_by_id(rid).edits(ctx), out)  # [B, M]
    return out & ctx.valid
