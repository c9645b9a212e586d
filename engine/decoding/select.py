"""Commit selection over the current block, vectorised across rows (padded [B, M] layout).

Per row exactly one rule applies:
- fixed count k (the algorithm's schedule): the top-k by score (Dream alg_temp > 0: k positions sampled without
  replacement from softmax(score / alg_temp), via Gumbel-top-k);
- threshold tau: every selectable position with conf >= tau, and always the top-scored one;
- quota + threshold (LLaDA2, rows flagged quota_rule, count = the step's quota q): the positions with conf
  strictly > tau when there are at least q of them (all of them, even more than q), else the top-q;
- factor f: over confidences sorted c_1 >= c_2 >= ..., the largest n with (n + 1)(1 - c_n) < f (at least 1);
- origin p (Dream): each selectable position independently with probability p.
Rows whose step bound is reached commit everything selectable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import noise


@dataclass(slots=True)
class SelectInputs:
    count: torch.Tensor  # [B] int64 fixed commit count, -1 for rows with another rule
    max_count: int  # host-side max of count (top-k width)
    threshold: torch.Tensor  # [B] float64, nan = unused
    factor: torch.Tensor  # [B] float64, nan = unused
    origin_prob: torch.Tensor  # [B] float64, nan = unused
    alg_temp: torch.Tensor  # [B] float64, 0 = deterministic top-k
    commit_all: torch.Tensor  # [B] bool: last allowed step, commit every selectable position
    noise_keys: torch.Tensor  # [B, M] int64
    any_threshold: bool
    any_factor: bool
    any_origin: bool
    any_alg_temp: bool
    quota_rule: torch.Tensor | None = None
    """[B] bool: rows using the quota + strict-threshold rule (LLaDA2); None: no such row."""


def _rank_mask(order: torch.Tensor, n: torch.Tensor, width: int) -> torch.Tensor:
    """order [B, K] column indices ranked best-first; n [B] -> [B, width] bool marking the first n of each row."""
    take = torch.arange(order.shape[1], device=order.device)[None, :] < n[:, None]  # [B, K]
    out = torch.zeros(order.shape[0], width, dtype=torch.bool, device=order.device)
    return out.scatter(1, order, take)


def select(score: torch.Tensor, conf: torch.Tensor, selectable: torch.Tensor, inp: SelectInputs) -> torch.Tensor:
    """score/conf [B, M] float64, selectable [B, M] bool -> commit [B, M] bool."""
    B, M = score.shape
    ranked = score.masked_fill(~selectable, float("-inf"))  # [B, M]
    commit = torch.zeros(B, M, dtype=torch.bool, device=score.device)
    if inp.max_count > 0:
        keyed = ranked
        if inp.any_alg_temp:
            u = noise.uniform(inp.noise_keys ^ noise.STREAM_ALG_TEMP)  # [B, M]
            soft = torch.log_softmax(ranked / inp.alg_temp.clamp_min(1e-12)[:, None], dim=-1) - torch.log(-torch.log(u))
            keyed = torch.where((inp.alg_temp > 0)[:, None], soft.masked_fill(~selectable, float("-inf")), ranked)
        order = torch.topk(keyed, min(inp.max_count, M), dim=-1).indices  # [B, K]
        commit = _rank_mask(order, inp.count.clamp_min(0), M)
    if inp.any_threshold or inp.any_factor:
        top1 = _rank_mask(ranked.argmax(-1, keepdim=True), torch.ones(B, dtype=torch.long, device=score.device), M)
        if inp.any_threshold:
            rows = ~torch.isnan(inp.threshold)
            hit = (conf >= inp.threshold[:, None]) & selectable | top1
            if inp.quota_rule is not None:
                strict = (conf > inp.threshold[:, None]) & selectable  # [B, M]
                enough = strict.sum(1) >= inp.count  # [B]
                hit = torch.where(inp.quota_rule[:, None], torch.where(enough[:, None], strict, commit), hit)
            commit = torch.where(rows[:, None], hit & selectable, commit)
        if inp.any_factor:
            rows = ~torch.isnan(inp.factor)
            order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices  # [B, M]
            c = conf.gather(1, order)  # [B, M] best-first
            valid = selectable.gather(1, order)
            n = torch.arange(1, M + 1, device=score.device, dtype=torch.float64)[None, :]
            ok = ((n + 1) * (1 - c) < inp.factor[:, None]) & valid
            best = torch.where(ok, n, torch.zeros_like(n)).amax(-1).long().clamp_min(1)  # [B]
            commit = torch.where(rows[:, None], _rank_mask(order, best, M) & selectable, commit)
    if inp.any_origin:
        rows = ~torch.isnan(inp.origin_prob)
        u = noise.uniform(inp.noise_keys ^ noise.STREAM_ORIGIN)  # [B, M]
        commit = torch.where(rows[:, None], selectable & (u < inp.origin_prob[:, None]), commit)
    return torch.where(inp.commit_all[:, None], selectable, commit & selectable)
