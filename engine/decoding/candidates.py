"""Candidate tokens and confidence scores at the positions being decoded.

Two scoring conventions (chosen per row by its algorithm):
- clean (LLaDA): the candidate x0 is drawn from the temperature-scaled, filtered logits (Gumbel-max, float64
  noise); scores come from the plain softmax of the raw logits.
- tempered (Dream, RND1): scores come from the softmax of the same temperature-scaled, filtered logits.
The mask token is never a candidate (its logit is excluded from the argmax only, so scores still use the full
softmax): the LLaDA reference can "commit" MASK, leaving a hole that later blocks re-decode; we never do.
The three ways to get there (the torch path over full logits, kernels/vocab.py's fused pass, the vocabulary
shards' statistics) all end in the same ScoreStats (p(x0), and lazily the top-2 margin, -H and a uniform draw),
from which each row's remasking rule (engine/decoding/remasking/, via the registry) makes its score and its [0, 1]
confidence for threshold/factor tests: `combine_scores`, one vectorised pass per rule present in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from . import noise
from .registry import remasking_by_id


class ScoreStats:
    """Per decoded position statistics [N] float64 a remasking rule scores from; each computed once, on first use
    (a batch that no rule asks the margin of never computes it)."""

    def __init__(self, p_x0: torch.Tensor, margin_fn: Callable[[], torch.Tensor],
                 neg_h_fn: Callable[[], torch.Tensor], noise_keys: torch.Tensor) -> None:
        self.p_x0 = p_x0  # [N] probability of the candidate token
        self._margin_fn, self._neg_h_fn, self._keys = margin_fn, neg_h_fn, noise_keys

    @cached_property
    def margin(self) -> torch.Tensor:
        """[N] p1 - p2 of the two most likely tokens."""
        return self._margin_fn()

    @cached_property
    def neg_entropy(self) -> torch.Tensor:
        """[N] sum p log p (= -H) of the score distribution."""
        return self._neg_h_fn()

    @cached_property
    def uniform(self) -> torch.Tensor:
        """[N] U(0, 1) from the position's counter-based noise key (its own stream)."""
        return noise.uniform(self._keys ^ noise.STREAM_RANDOM_SCORE)


def combine_scores(stats: ScoreStats, rule: torch.Tensor, present: frozenset[int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's score and confidence [N] by its remasking rule id (rule [N] int64); `present` (host) lists the
    ids in the batch, so each rule runs once over all rows and no device sync is needed to branch."""
    score = conf = None
    for rid in sorted(present):
        s, c = remasking_by_id(rid).score(stats)
        if score is None:
            score, conf = s, c
        else:
            rows = rule == rid
            score, conf = torch.where(rows, s, score), torch.where(rows, c, conf)
    if score is None:  # no position decoded
        return stats.p_x0, stats.p_x0
    return score, conf


@dataclass(slots=True)
class CandidateInputs:
    temperature: torch.Tensor  # [N] float32
    top_k: torch.Tensor  # [N] int64, 0 = off
    top_p: torch.Tensor  # [N] float32, 1 = off
    score: torch.Tensor  # [N] int64 remasking rule id (registry)
    tempered: torch.Tensor  # [N] bool: Dream/RND1 scoring
    noise_keys: torch.Tensor  # [N] int64 per-position noise keys (seed, step, position)
    mask_id: int
    any_sampling: bool
    any_filter: bool
    codes: frozenset[int] = frozenset({0})
    """Remasking rule ids present in the batch (host-side, so no device sync is needed to branch)."""
    any_tempered: bool = False
    backend: str = "torch"
    """"triton": x0 and the scores from kernels/vocab.py's one pass (unless the batch filters top-k/top-p)."""


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row top-k then top-p (nucleus) filtering; filtered entries become -inf. logits [N, V]."""
    sorted_l, order = torch.sort(logits, dim=-1, descending=True)  # [N, V]
    V = logits.shape[-1]
    ranks = torch.arange(V, device=logits.device)[None, :]  # [1, V]
    remove = (top_k[:, None] > 0) & (ranks >= top_k[:, None])  # [N, V] in sorted order
    sorted_l = sorted_l.masked_fill(remove, float("-inf"))
    cum = torch.cumsum(torch.softmax(sorted_l, dim=-1), dim=-1)  # [N, V]
    drop = cum > top_p[:, None]
    drop = torch.cat([torch.zeros_like(drop[:, :1]), drop[:, :-1]], dim=-1)  # always keep the first
    remove = remove | (drop & (top_p[:, None] < 1))
    return logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), float("-inf"))


def _argmax_without(x: torch.Tensor, col: int) -> torch.Tensor:
    """argmax over the last dim with column `col` excluded, without copying x (the column is restored)."""
    saved = x[:, col].clone()  # [N]
    x[:, col] = float("-inf")
    out = x.argmax(-1)
    x[:, col] = saved
    return out


def candidates(logits: torch.Tensor, inp: CandidateInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] float32 -> x0 [N] int64, score [N] float64 (ranking), conf [N] float64 in [0, 1]."""
    if inp.backend == "triton" and not inp.any_filter:
        from kernels.vocab import vocab_scores
        x0, p_x0, margin, neg_h = vocab_scores(logits, inp.temperature, inp.noise_keys, inp.tempered, inp.mask_id,
                                               inp.any_sampling)
        return _combine(inp, x0, p_x0, lambda: margin, lambda: neg_h)
    temp = inp.temperature[:, None]  # [N, 1]
    if inp.any_sampling:  # greedy batches skip every pass that only sampling needs
        tempered = torch.where(temp > 0, logits / temp.clamp_min(1e-8), logits)  # [N, V]
    else:
        tempered = logits
    filtered = _filter(tempered, inp.top_k, inp.top_p) if inp.any_filter else tempered
    if inp.any_sampling:
        u = noise.uniform(inp.noise_keys, logits.shape[-1])  # [N, V] float64
        perturbed = torch.where(temp > 0, filtered.double() - torch.log(-torch.log(u)), filtered.double())
        perturbed[:, inp.mask_id] = float("-inf")
        x0 = perturbed.argmax(-1)  # [N]
    else:
        x0 = _argmax_without(filtered, inp.mask_id)  # [N]
    if inp.any_tempered:
        score_logits = torch.where(inp.tempered[:, None], filtered, logits)
    else:
        score_logits = logits
    p = torch.softmax(score_logits, dim=-1)  # [N, V], exactly the reference's F.softmax
    p_x0 = p.gather(-1, x0[:, None])[:, 0].double()  # [N]

    def margin() -> torch.Tensor:
        top2 = p.topk(2, dim=-1).values.double()  # [N, 2]
        return top2[:, 0] - top2[:, 1]

    def neg_entropy() -> torch.Tensor:
        logp = torch.log_softmax(score_logits, dim=-1)  # [N, V]
        return torch.nan_to_num(p * logp, nan=0.0).sum(-1).double()  # [N], -H

    return _combine(inp, x0, p_x0, margin, neg_entropy)


def _combine(inp: CandidateInputs, x0: torch.Tensor, p_x0: torch.Tensor, margin_fn: Callable[[], torch.Tensor],
             neg_h_fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x0, *combine_scores(ScoreStats(p_x0, margin_fn, neg_h_fn, inp.noise_keys), inp.score, inp.codes)


# Vocabulary-parallel decoding -----------------------------------------------------------------------------------
# With the vocabulary split over tensor-parallel ranks, a batch without top-k/top-p needs from each rank only a few
# numbers per position, never the full logits. Each shard draws its own columns of the Gumbel noise (the noise is
# counter-based per column), so its best candidate is the full row's argmax restricted to the shard; it also reports,
# in the scoring space (raw or tempered logits), the candidate's logit, its max m_r, s_r = sum exp(l - m_r),
# t_r = sum exp(l - m_r)(l - m_r) and its top-2. Combined: m = max m_r, S = sum s_r e^(m_r - m),
# p(x0) = e^(l_x0 - m) / S, sum p log p = T / S - log S with T = sum e^(m_r - m)(t_r + (m_r - m) s_r), and the
# margin from the global top-2.
STAT_COLS = 8


@dataclass(slots=True)
class ShardDecode:
    """What a vocabulary shard needs to reduce its logits for decoding; per decoded position [N]."""
    mask_id: int
    temperature: torch.Tensor  # [N] float32
    tempered: torch.Tensor  # [N] bool: Dream/RND1 scoring (from the tempered logits)
    noise_keys: torch.Tensor  # [N] int64
    any_sampling: bool
    any_tempered: bool

    def rows(self, a: int, b: int) -> "ShardDecode":
        """The decoded positions [a, b) (one chunk of a step's logit rows)."""
        return ShardDecode(self.mask_id, self.temperature[a:b], self.tempered[a:b], self.noise_keys[a:b],
                           self.any_sampling, self.any_tempered)

    def to(self, device: torch.device | str) -> "ShardDecode":
        nb = torch.device(device).type != "cpu"
        return ShardDecode(self.mask_id, self.temperature.to(device, non_blocking=nb),
                           self.tempered.to(device, non_blocking=nb), self.noise_keys.to(device, non_blocking=nb),
                           self.any_sampling, self.any_tempered)


def shard_stats(logits: torch.Tensor, vocab_start: int, dec: ShardDecode) -> torch.Tensor:
    """logits [N, Vs] float32 of vocabulary columns [vocab_start, vocab_start + Vs) -> [N, 8] float64:
    (candidate's perturbed value, its global id, its scoring logit, m_r, s_r, t_r, top1, top2); the mask column is
    never a candidate. Same arithmetic as `candidates` on these columns (no top-k/top-p)."""
    N, Vs = logits.shape
    temp = dec.temperature[:, None]  # [N, 1]
    tempered = torch.where(temp > 0, logits / temp.clamp_min(1e-8), logits) if dec.any_sampling else logits
    if dec.any_sampling:
        u = noise.uniform(dec.noise_keys, Vs, start=vocab_start)  # [N, Vs] float64, this shard's columns
        perturbed = torch.where(temp > 0, tempered.double() - torch.log(-torch.log(u)), tempered.double())
    else:
        perturbed = tempered.clone()
    col = dec.mask_id - vocab_start
    if 0 <= col < Vs:
        perturbed[:, col] = float("-inf")
    best_v, best_i = perturbed.max(-1)  # [N]
    score_logits = torch.where(dec.tempered[:, None], tempered, logits) if dec.any_tempered else logits
    m = score_logits.max(-1).values  # [N]
    z = score_logits - m[:, None]  # [N, Vs]
    e = z.exp()
    top = score_logits.topk(min(2, Vs), dim=-1).values  # [N, <=2]
    if Vs < 2:
        top = torch.cat([top, torch.full_like(top, float("-inf"))], dim=-1)
    cols = [best_v.double(), (best_i + vocab_start).double(), score_logits.gather(-1, best_i[:, None])[:, 0].double(),
            m.double(), e.sum(-1).double(), torch.nan_to_num(e * z, nan=0.0).sum(-1).double(), top[:, 0].double(),
            top[:, 1].double()]
    return torch.stack(cols, dim=-1)  # [N, 8]


def candidates_from_stats(stats: torch.Tensor, inp: CandidateInputs) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """stats [R, N, 8] (one shard_stats per vocabulary shard, in vocabulary order) -> x0, score, conf as
    `candidates` computes them for a batch without top-k/top-p (float64 instead of float32 softmax)."""
    best_v, best_id, best_l = stats[..., 0], stats[..., 1], stats[..., 2]
    m_r, s_r, t_r = stats[..., 3], stats[..., 4], stats[..., 5]
    m = m_r.max(0).values  # [N]
    w = torch.exp(m_r - m)  # [R, N]
    S = (s_r * w).sum(0)  # [N]
    shard = best_v.argmax(0)  # [N] first shard holding the max: the lowest id on ties, as argmax
    ar = torch.arange(stats.shape[1], device=stats.device)
    x0 = best_id[shard, ar].long()
    p_x0 = torch.exp(best_l[shard, ar] - m) / S

    def margin() -> torch.Tensor:
        top2 = stats[..., 6:8].permute(1, 0, 2).reshape(stats.shape[1], -1).topk(2, dim=-1).values  # [N, 2]
        return (torch.exp(top2[:, 0] - m) - torch.exp(top2[:, 1] - m)) / S

    def neg_entropy() -> torch.Tensor:
        T = ((t_r + (m_r - m) * s_r) * w).sum(0)  # [N]
        return T / S - torch.log(S)

    return _combine(inp, x0, p_x0, margin, neg_entropy)
