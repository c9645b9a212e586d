"""Constrained commits for one request (Constraint) and the per-step hook the runner calls (StepConstraints).

The rule (see constraints/__init__.py for why): a constrained request commits, each step, the frontier (its first
still-masked position) and consecutive positions after it, left to right. Each is drawn by the request's own
candidate rule (temperature, top-k/top-p, Gumbel noise keys, scoring) from its logits restricted to the tokens
the grammar allows after the tokens before it; the run continues while the request's commit rule holds:
- a fixed schedule (llada / dream / rnd1 counts, Dream's `origin`, the last allowed step): its count;
- threshold: the next candidate's confidence (under the restricted distribution) >= threshold;
- factor: (n + 1)(1 - min confidence) < factor.
Tokens the grammar forces (a single allowed token) always commit: the schema's fixed text fills in at once.

Completion within the canvas: the request keeps a closing path, a short token sequence that takes the grammar from
its state to acceptance (greedy rollout over the allowed tokens in Vocab.closing_order, one-step look-ahead for
acceptance). Before committing a token it checks that a closing path (plus one EOS) still fits in the positions
left after it; if not, it commits the next token of the current path instead. So once a request starts with a
path that fits, it always ends accepted, then EOS (finish_reason stop). After EOS, its remaining positions are
filled with that EOS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from ..decoding import registry
from ..decoding.candidates import CandidateInputs, candidates
from .grammars import Vocab

LOOKAHEAD = 8
"""Closing rollout: allowed tokens (best closers first) tried for immediate acceptance at each step."""


class Constraint:
    """A request's grammar state over its committed tokens (left to right)."""

    def __init__(self, matcher: Any, vocab: Vocab, stop_ids: list[int], mask_id: int) -> None:
        self.m = matcher.deep_copy()
        self.vocab = vocab
        self.stop_ids = list(stop_ids)
        self.mask_id = mask_id
        self.eos: int | None = None
        """The token every later position gets: the stop token committed once the grammar accepted (or, at a
        dead end where the vocabulary can spell nothing allowed, a plain filler token: finish_reason length)."""
        self.path: list[int] | None = None
        """Closing path from the current state (None: not computed, or no path fits the canvas)."""
        self._path_known = False
        self.mask_calls = 0

    # masks --------------------------------------------------------------------------------------------------
    def allowed(self) -> np.ndarray:
        """[V] bool: the tokens the grammar allows next (stop tokens only when it accepts; never the mask)."""
        self.mask_calls += 1
        ok = self.vocab.mask(self.m)
        ok[self.stop_ids] = self.m.is_accepting()
        ok[self.mask_id] = False
        return ok

    def closing(self, cap: int) -> list[int] | None:
        """A token path from the current state to acceptance of at most `cap` tokens, or None. Greedy over
        Vocab.closing_order; if that does not fit, again with a one-step look-ahead for acceptance (which finds
        the exit of loops such as (ab)*c)."""
        path = self._rollout(cap, 0)
        return path if path is not None else self._rollout(cap, LOOKAHEAD)

    def _rollout(self, cap: int, lookahead: int) -> list[int] | None:
        m, order, n = self.m, self.vocab.closing_order, 0
        path: list[int] = []
        if cap < 0:
            return None
        try:
            while not m.is_accepting():
                if n >= cap:
                    return None
                ok = self.allowed()
                ranked = order[ok[order]]
                if ranked.size == 0:
                    return None
                pick = int(ranked[0])
                for t in ranked[:lookahead].tolist():
                    if m.consume_token(t):
                        acc = m.is_accepting()
                        m.rollback(1)
                        if acc:
                            pick = t
                            break
                m.consume_token(pick)
                path.append(pick)
                n += 1
            return path
        finally:
            m.rollback(n)

    # commits ------------------------------------------------------------------------------------------------
    def commit(self, token: int, room: int) -> int:
        """Commit `token` (allowed by the grammar) at a position with `room` generated positions from it to the
        canvas end (itself included), unless that leaves no closing path that fits: then the path's next token.
        Returns the token committed."""
        if self.eos is not None:
            return self.eos
        if token in self.stop_ids:
            self.eos = token
            return token
        if not self._path_known:
            self.path, self._path_known = self.closing(room - 1), True
        path = self.path
        if path is not None:
            if path and token == path[0]:
                self.path = path[1:]
            else:
                self.m.consume_token(token)
                after = self.closing(room - 2)
                if after is not None:
                    self.path = after
                    return token
                self.m.rollback(1)
                if not path:  # accepting and nothing else fits: end here
                    self.eos = self.stop_ids[0]
                    return self.eos
                token, self.path = path[0], path[1:]
        self.m.consume_token(token)
        return token


@dataclass(slots=True)
class _Rule:
    quota: int  # positions the schedule commits (threshold/factor rows: 1, the frontier)
    threshold: float = math.nan
    factor: float = math.nan

    def more(self, n: int, conf: float, min_conf: float) -> bool:
        """Whether the n-th position of the run (0-based) commits, given its confidence."""
        if n < self.quota:
            return True
        if not math.isnan(self.threshold):
            return conf >= self.threshold
        if not math.isnan(self.factor):
            return (n + 2) * (1 - min(min_conf, conf)) < self.factor
        return False


def _rule(seq: Any) -> _Rule:
    p, n = seq.params, seq.masked_in_block
    if seq.is_last_allowed_step:
        return _Rule(n)
    if p.threshold is not None:
        return _Rule(1, threshold=p.threshold)
    if p.factor is not None:
        return _Rule(1, factor=p.factor)
    value = registry.transfer(p.transfer).step_value(seq)  # the row's rule this step (engine/decoding/transfer/)
    if p.transfer == "origin":  # a reveal probability
        return _Rule(n if value >= 1 else max(1, round(value * n)))
    return _Rule(max(int(value), 0))


class _Row:
    """One constrained request in this step: its positions in the flattened [N] decode order."""

    def __init__(self, index: int, start: int, count: int, seq: Any, canvas_end: int) -> None:
        self.index, self.start, self.count, self.seq = index, start, count, seq
        self.first_room = canvas_end - (seq.block_bounds()[1] - count)  # room at the frontier
        self.rule = _rule(seq)
        self.tokens: list[int] = []
        self.active = count > 0
        self.min_conf = 1.0


class StepConstraints:
    """The runner's hook for one step: sees the logits of constrained requests' positions as they are scored
    (`consume`), then overrides those requests' candidates and commits (`apply`). Unconstrained rows are never
    touched."""

    def __init__(self, reqs: list[Any], counts: list[int]) -> None:
        self.rows: list[_Row] = []
        start = 0
        for i, (r, n) in enumerate(zip(reqs, counts)):
            if r.seq.constraint is not None:
                self.rows.append(_Row(i, start, n, r.seq, r.seq.canvas_len))
            start += n

    @staticmethod
    def of(reqs: list[Any], counts: list[int]) -> "StepConstraints | None":
        return StepConstraints(reqs, counts) if any(r.seq.constraint is not None for r in reqs) else None

    def consume(self, a: int, b: int, logits: torch.Tensor, inputs: CandidateInputs) -> None:
        """logits [b - a, V] of the flat decoded positions [a, b), inputs for the same rows."""
        for row in self.rows:
            lo, hi = max(a, row.start), min(b, row.start + row.count)
            k = lo
            while row.active and k < hi:
                self._offer(row, k - row.start, logits[k - a], inputs, k - a)
                k += 1

    def _offer(self, row: _Row, n: int, logits: torch.Tensor, inputs: CandidateInputs, k: int) -> None:
        c: Constraint = row.seq.constraint
        if n != len(row.tokens):  # a position was skipped: the run has ended
            row.active = False
            return
        room = row.first_room - n
        if c.eos is not None:
            row.tokens.append(c.eos)
            return
        ok = c.allowed()
        if not ok.any():  # a dead end: this vocabulary cannot spell any continuation. Fill the canvas with a
            # plain token (no EOS), so the request ends with finish_reason "length", never "stop" on invalid text
            c.eos = int(c.vocab.closing_order[0])
            row.tokens.append(c.eos)
            return
        forced = int(ok.sum()) == 1
        allowed = torch.from_numpy(ok)
        if logits.device.type != "cpu":
            allowed = allowed.to(logits.device)
        masked = logits.masked_fill(~allowed[:logits.shape[-1]], float("-inf"))
        x0, _, conf = candidates(masked[None], _one(inputs, k))  # [1] each
        token, cf = int(x0[0]), float(conf[0])
        if n > 0 and not forced and not row.rule.more(n, cf, row.min_conf):
            row.active = False
            return
        row.min_conf = min(row.min_conf, cf)
        row.tokens.append(c.commit(token, room))

    def apply(self, x0: torch.Tensor, commit: torch.Tensor) -> torch.Tensor:
        """Write the constrained rows' tokens into x0 [N] and their commits into commit [B, M] (returned)."""
        idx, toks, rows, width = [], [], [], []
        for row in self.rows:
            idx += range(row.start, row.start + len(row.tokens))
            toks += row.tokens
            rows.append(row.index)
            width.append(len(row.tokens))
        dev = x0.device
        if idx:
            x0[torch.tensor(idx, device=dev)] = torch.tensor(toks, dtype=x0.dtype, device=dev)
        M = commit.shape[1]
        mine = torch.arange(M)[None, :] < torch.tensor(width)[:, None]  # [Bc, M]
        commit = commit.clone()
        commit[torch.tensor(rows, device=dev)] = mine.to(dev)
        return commit


_PER_ROW = tuple(f.name for f in fields(CandidateInputs) if "Tensor" in str(f.type))
"""CandidateInputs' per-position [N] tensors (temperature, top_k, top_p, score, tempered, noise_keys)."""


def _one(inp: CandidateInputs, k: int) -> CandidateInputs:
    """The candidate inputs of one decoded position (row k of the chunk)."""
    return replace(inp, **{name: getattr(inp, name)[k:k + 1] for name in _PER_ROW})
