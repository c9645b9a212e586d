"""Commit selection over the current block, vectorised across rows (padded [B, M] layout).

Per row exactly one transfer rule applies (engine/decoding/transfer/, the registry): the algorithm's fixed schedule
(top-k by score, k from the host; Dream alg_temp > 0 samples the k positions without replacement from
softmax(score / alg_temp) via Gumbel-top-k), or a rule turned on by a request field (threshold, factor), or one
implied by the remasking rule (Dream's origin), or LLaDA2's quota + strict threshold (transfer/llada2.py).
`select` runs each distinct rule function present once over the whole batch and keeps its rows (no per-row Python
loop). Rows whose step bound is reached under an adaptive rule commit everything selectable.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from functools import cached_property

import torch

from . import noise
from .registry import transfer_by_id


@dataclass(slots=True)
class SelectInputs:
    rule: torch.Tensor  # [B] int64 transfer rule id (registry)
    value: torch.Tensor  # [B] float64 the rule's number for this step (count, threshold, factor, probability)
    host_value: list[float]  # the same, on the host (rule widths without a device sync)
    host_rule: list[int]  # rule ids on the host
    alg_temp: torch.Tensor  # [B] float64, 0 = deterministic top-k
    commit_all: torch.Tensor  # [B] bool: last allowed step of an adaptive rule, commit every selectable position
    noise_keys: torch.Tensor  # [B, M] int64
    any_alg_temp: bool
    threshold: torch.Tensor | None = None  # [B] float64 each row's threshold (nan = none), for the rules reading it


@dataclass
class SelectContext:
    """What a transfer rule's device function sees (every row of the batch; only its own rows are kept)."""
    score: torch.Tensor  # [B, M] float64
    conf: torch.Tensor  # [B, M] float64 in [0, 1]
    selectable: torch.Tensor  # [B, M] bool: still masked and inside the block
    alg_temp: torch.Tensor  # [B] float64
    noise_keys: torch.Tensor  # [B, M] int64
    any_alg_temp: bool
    threshold: torch.Tensor | None = None  # [B] float64 each row's threshold column (nan = none)
    ranked: torch.Tensor = field(init=False)  # [B, M] score, -inf where not selectable

    def __post_init__(self) -> None:
        self.ranked = self.score.masked_fill(~self.selectable, float("-inf"))

    @cached_property
    def top1(self) -> torch.Tensor:
        """[B, M] bool: each row's top-scored position."""
        B, M = self.ranked.shape
        return rank_mask(self.ranked.argmax(-1, keepdim=True), torch.ones(B, dtype=torch.long,
                                                                           device=self.ranked.device), M)


def rank_mask(order: torch.Tensor, n: torch.Tensor, width: int) -> torch.Tensor:
    """order [B, K] column indices ranked best-first; n [B] -> [B, width] bool marking the first n of each row."""
    take = torch.arange(order.shape[1], device=order.device)[None, :] < n[:, None]  # [B, K]
    out = torch.zeros(order.shape[0], width, dtype=torch.bool, device=order.device)
    return out.scatter(1, order, take)


def top_count(ctx: SelectContext, count: torch.Tensor, max_count: float) -> torch.Tensor:
    """The fixed schedules' rule: the `count` best-scored selectable positions (alg_temp > 0: sampled)."""
    B, M = ctx.ranked.shape
    k = min(int(max_count), M)
    if k <= 0:
        return torch.zeros(B, M, dtype=torch.bool, device=ctx.ranked.device)
    keyed = ctx.ranked
    if ctx.any_alg_temp:
        u = noise.uniform(ctx.noise_keys ^ noise.STREAM_ALG_TEMP)  # [B, M]
        soft = torch.log_softmax(ctx.ranked / ctx.alg_temp.clamp_min(1e-12)[:, None], dim=-1) - torch.log(-torch.log(u))
        keyed = torch.where((ctx.alg_temp > 0)[:, None], soft.masked_fill(~ctx.selectable, float("-inf")), ctx.ranked)
    order = torch.topk(keyed, k, dim=-1).indices  # [B, K]
    return rank_mask(order, count.long().clamp_min(0), M)


def select(score: torch.Tensor, conf: torch.Tensor, selectable: torch.Tensor, inp: SelectInputs) -> torch.Tensor:
    """score/conf [B, M] float64, selectable [B, M] bool -> commit [B, M] bool."""
    ctx = SelectContext(score, conf, selectable, inp.alg_temp, inp.noise_keys, inp.any_alg_temp, inp.threshold)
    groups: dict[object, list[int]] = {}  # rule function -> the rule ids using it (fixed schedules share one)
    widths: dict[object, float] = {}
    for rid, v in zip(inp.host_rule, inp.host_value):
        fn = transfer_by_id(rid).select
        ids = groups.setdefault(fn, [])
        if rid not in ids:
            ids.append(rid)
        widths[fn] = max(widths.get(fn, v), v)
    commit = None
    for fn, ids in groups.items():
        c = fn(ctx, inp.value, widths[fn])  # [B, M]
        if commit is None:
            commit = c
        else:
            rows = functools.reduce(operator.or_, [inp.rule == i for i in ids])  # [B]
            commit = torch.where(rows[:, None], c, commit)
    if commit is None:
        commit = torch.zeros_like(selectable)
    return torch.where(inp.commit_all[:, None], selectable, commit & selectable)
