"""RequestOutput and the cut rules: first stop token (EOS / end-of-turn) unless ignore_eos, then stop strings."""
from __future__ import annotations

from dataclasses import dataclass

from .sequence import SeqStats
from .step_log import StepLog


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    """Generated ids, cut at the first EOS/end-of-turn token (the whole canvas with ignore_eos=True)."""
    text: str | None
    """Decoded token_ids (special tokens skipped), cut at the first stop string; None without a tokenizer."""
    finish_reason: str | None
    """'stop' (EOS, end-of-turn or a stop string), 'length', 'abort'; None while unfinished."""
    stats: SeqStats
    prompt: str | None = None
    finished: bool = True
    seed: int | None = None
    """The sampling seed used (drawn at random when the request gave none): SamplingParams(seed=out.seed) with the
    same prompt and parameters replays it exactly."""
    step_log: StepLog | None = None
    """The request's per-step commits, for requests that asked (AsyncEngine record_steps); else None."""

    @property
    def steps(self) -> int:
        return self.stats.steps

    @property
    def forward_passes(self) -> int:
        return self.stats.forward_passes

    @property
    def tokens_per_forward(self) -> float:
        return self.stats.tokens_per_forward


def cut_at_stop_token(ids: list[int], stop_ids: tuple[int, ...]) -> tuple[list[int], bool]:
    stops = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i], True
    return ids, False
