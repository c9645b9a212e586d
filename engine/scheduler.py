"""Scheduler: waiting queue -> running set, admission under a batch limit, a per-step token budget and free KV
pages. First-come-first-served. Plain Python, no torch.

Each step `schedule()` returns the running requests to step, in arrival order, as many as the token budget allows
(the oldest always runs, so nobody starves); `update()` takes the runner's results back.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .cache_manager import PageAllocator
from .sequence import Sequence, Status


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most requests running at once."""
    max_num_batched_tokens: int = 16384
    """Per-step budget of query positions fed through the network (a refresh pass costs the whole canvas)."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(slots=True)
class ScheduleOutput:
    seqs: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, allocator: PageAllocator) -> None:
        self.cfg, self.allocator = cfg, allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._arrivals = 0

    def pages_needed(self, seq: Sequence) -> int:
        return self.allocator.pages_for(seq.canvas_len) * seq.num_rows

    def add(self, seq: Sequence) -> None:
        need = self.pages_needed(seq)
        if need > self.allocator.num_pages:
            raise MemoryError(
                f"request {seq.request_id}: its canvas (prompt {seq.prompt_len} + max_tokens {seq.gen_len} tokens"
                f"{', x2 for cfg_scale' if seq.num_rows > 1 else ''}) needs {need} KV pages but the pool has "
                f"{self.allocator.num_pages} in all; lower max_tokens or raise the KV memory")
        seq.arrival = self._arrivals
        self._arrivals += 1
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduleOutput:
        out = ScheduleOutput()
        budget = self.cfg.max_num_batched_tokens
        for seq in self.running:
            cost = seq.step_cost()
            if out.seqs and cost > budget:
                continue
            out.seqs.append(seq)
            budget -= cost
        while self.waiting and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            cost, need = seq.step_cost(), self.pages_needed(seq)
            if (out.seqs and cost > budget) or not self.allocator.can_allocate(need):
                break
            self.waiting.popleft()
            seq.pages = self.allocator.allocate(need)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.admitted.append(seq)
            budget -= cost
        return out

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished (or aborted) and free its pages now."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.allocator.free(seq.pages)
        seq.pages = []
        seq.status, seq.finish_reason = Status.FINISHED, reason
