"""Scheduler: waiting queue -> running set under a batch limit, a per-step token budget and free KV pages.
Plain Python, no torch.

Each step `schedule()` returns a ScheduleOutput: for every request that runs, a refresh pass (its whole canvas;
fills the cache) or a block pass (the current block, plus the suffix for prefix caching), with its positions.
`update()` takes the runner's RunnerOutput back, advances each request and returns what finished.

Policies:
- Running requests are stepped in arrival order and the oldest always runs (the token budget may hold newer ones
  back for a step).
- Pages: a request holds pages for its whole canvas (and its CFG twin) from admission to finish; they are freed in
  the step it finishes or is aborted. A running request never needs more, so running requests never stall.
- Admission in arrival order, with backfill: when the oldest waiting request (the head) does not fit in the free
  pages, younger waiting requests that do fit may start meanwhile.
- Preemption guards the head against starvation by backfilled requests: once the head has been blocked for
  `preempt_after_steps` steps, backfill stops and, as soon as freeing them makes the head fit, running requests
  younger than the head that sit at a safe point are preempted, youngest first. Their pages are freed and they go
  back to the waiting queue keeping their canvas. Safe points lose nothing: cache="none" requests keep no K/V
  between steps, and cached requests are preempted only at a block boundary, where their next step is a refresh
  pass anyway. Older requests are never preempted for younger ones, so every request eventually becomes the head
  and runs: nobody starves.
- Prefix caching (block-causal families, engine/prefix_cache.py): at admission a request's prompt is looked up;
  the cached pages of its longest matching prefix join its block table (counted as taken, not newly allocated) and
  its passes start after them (`Sequence.cached_prefix_len`). After the step whose query range covered its
  shareable prompt pages, those pages are registered in the cache for later requests. Finishing or preemption
  releases pages to the cache (cached ones become evictable, least recently used first) instead of freeing them.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .cache_manager import PageAllocator
from .errors import RequestTooLargeError
from .prefix_cache import PrefixCache, page_keys
from .sequence import Sequence, Status


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most requests running at once."""
    max_num_batched_tokens: int = 16384
    """Per-step budget of query positions fed through the network (a refresh pass costs the whole canvas)."""
    preempt_after_steps: int = 8
    """Steps the oldest waiting request may be blocked on pages before younger running requests are preempted."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "preempt_after_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(slots=True)
class ScheduledRequest:
    seq: Sequence
    refresh: bool
    """True: a full pass over the canvas that also refills its K/V; False: a block pass against cached K/V."""
    query: tuple[int, int]
    """Canvas positions [start, end) fed through the network (for the CFG twin too)."""
    block: tuple[int, int]
    """Canvas positions [start, end) being decoded this step."""


@dataclass(slots=True)
class ScheduleOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    """Newly admitted (or readmitted after preemption) this step."""
    preempted: list[Sequence] = field(default_factory=list)
    num_tokens: int = 0

    @property
    def seqs(self) -> list[Sequence]:
        return [r.seq for r in self.scheduled]


@dataclass(slots=True)
class RunnerOutput:
    committed: list[int]
    """Per scheduled request: positions committed this step."""
    eos: list[bool]
    """Per scheduled request: a stop token is committed with every position before it committed."""
    edited: list[int] | None = None
    """Per scheduled request: committed tokens replaced this step (token editing); None: no editing row."""


@dataclass(slots=True)
class UpdateResult:
    finished: list[Sequence] = field(default_factory=list)
    blocks_done: list[Sequence] = field(default_factory=list)
    """Requests that completed a block this step and go on (stream a delta)."""


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, allocator: PageAllocator, prefix_cache: PrefixCache | None = None) -> None:
        self.cfg, self.allocator = cfg, allocator
        self.prefix_cache = prefix_cache
        """Set for block-causal families with prefix caching on; None: every page is private."""
        self.waiting: list[Sequence] = []  # sorted by arrival
        self.running: list[Sequence] = []  # sorted by arrival
        self._arrivals = 0
        self._blocked_head: Sequence | None = None
        self._blocked_steps = 0
        """Consecutive steps the current head of the waiting queue has been blocked on pages."""
        self.num_preemptions = 0

    def pages_needed(self, seq: Sequence) -> int:
        return self.allocator.pages_for(seq.canvas_len) * seq.num_rows

    def check_fits(self, seq: Sequence) -> None:
        """Raise RequestTooLargeError if the request could never run (its canvas needs more pages than the whole
        pool). Reads only the pool's fixed size, so any thread may call it."""
        need = self.pages_needed(seq)
        if need > self.allocator.num_pages:
            raise RequestTooLargeError(
                f"request {seq.request_id}: its canvas (prompt {seq.prompt_len} + max_tokens {seq.gen_len} tokens"
                f"{', x2 for cfg_scale' if seq.num_rows > 1 else ''}) needs {need} KV pages but the pool has "
                f"{self.allocator.num_pages} in all; lower max_tokens or raise the KV memory", "max_tokens")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        seq.arrival = self._arrivals
        self._arrivals += 1
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # schedule -----------------------------------------------------------------------------------------
    def schedule(self) -> ScheduleOutput:
        out = ScheduleOutput()
        self._admit(out)
        budget = self.cfg.max_num_batched_tokens
        for seq in self.running:
            cost = seq.step_cost()
            if out.scheduled and cost > budget:
                continue
            qa, qb = seq.query_range()
            out.scheduled.append(ScheduledRequest(seq, seq.needs_refresh, (qa, qb), seq.block_bounds()))
            out.num_tokens += cost
            budget -= cost
        return out

    def _admit(self, out: ScheduleOutput) -> None:
        i = 0  # waiting[:i] were passed over this step
        while i < len(self.waiting) and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[i]
            if seq in out.preempted:  # not back in the same step it left
                i += 1
                continue
            hit = self._prefix_hit(seq)
            need = self.pages_needed(seq) - len(hit)
            if not self._can_allocate(need, hit):
                if i > 0:  # a backfill candidate that does not fit either
                    i += 1
                    continue
                if seq is not self._blocked_head:
                    self._blocked_head, self._blocked_steps = seq, 0
                self._blocked_steps += 1
                starving = self._blocked_steps >= self.cfg.preempt_after_steps
                if not (starving and self._preempt_for(seq, need, hit, out)):
                    if starving:
                        return  # the pages that free up are kept for the head: no more backfill
                    i += 1
                    continue
            if seq is self._blocked_head:
                self._blocked_head, self._blocked_steps = None, 0
            self.waiting.pop(i)
            self._allocate(seq, need, hit)
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            out.admitted.append(seq)

    def _preempt_for(self, head: Sequence, need: int, hit: list[int], out: ScheduleOutput) -> bool:
        victims = [s for s in reversed(self.running) if s.arrival > head.arrival and s.at_safe_point]
        if self.prefix_cache is None:
            freeable = self.allocator.num_free + sum(len(s.pages) for s in victims)
        else:  # shared pages free up only when their last holder goes; the head's hits stay taken
            freeable = self.prefix_cache.num_free + self.prefix_cache.reclaimable([s.pages for s in victims]) - len(hit)
        if freeable < need:
            return False
        for seq in victims:
            if self._can_allocate(need, hit):
                break
            self.preempt(seq)
            out.preempted.append(seq)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free a running request's pages and requeue it (by arrival); its canvas is kept."""
        self.running.remove(seq)
        self._free(seq)
        seq.drop_cache()
        seq.status = Status.WAITING
        seq.stats.preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    # update -------------------------------------------------------------------------------------------
    def update(self, sched: ScheduleOutput, result: RunnerOutput) -> UpdateResult:
        upd = UpdateResult()
        edited = result.edited or [0] * len(result.committed)
        for req, committed, eos, edits in zip(sched.scheduled, result.committed, result.eos, edited):
            seq = req.seq
            self._register_prefix(req)
            block_done = seq.advance(committed, edits)
            if eos and not seq.params.ignore_eos:
                upd.finished.append(seq)
            elif block_done:
                if seq.next_block():
                    upd.blocks_done.append(seq)
                else:
                    upd.finished.append(seq)
        return upd

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished (or aborted, or failed) and free its pages now. Safe on a request that a failed step left
        half-updated (whatever its status says, it leaves both queues)."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq is self._blocked_head:
            self._blocked_head, self._blocked_steps = None, 0
        self._free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    # pages ------------------------------------------------------------------------------------------------
    def _prefix_hit(self, seq: Sequence) -> list[int]:
        """The cached pages seq's prompt starts with ([] without prefix caching; for a CFG request, whose
        unconditional twin sees another prompt; for cache "none", which recomputes every position each step).
        Computes seq's page keys on first use."""
        cache = self.prefix_cache
        if cache is None or seq.num_rows > 1 or seq.params.cache == "none":
            return []
        if seq.prefix_keys is None:
            seq.prefix_keys = page_keys(seq.prompt_ids, seq.params.block_length, cache.page_size)
        return cache.match(seq.prefix_keys)

    def _can_allocate(self, need: int, hit: list[int]) -> bool:
        if self.prefix_cache is None:
            return self.allocator.can_allocate(need)
        return self.prefix_cache.can_allocate(need, hit)

    def _allocate(self, seq: Sequence, need: int, hit: list[int]) -> None:
        cache = self.prefix_cache
        if cache is None:
            seq.pages = self.allocator.allocate(need)
            return
        seq.pages = cache.allocate(need, hit)
        seq.cached_prefix_len = len(hit) * cache.page_size
        seq.cached_upto = max(seq.cached_upto, seq.cached_prefix_len)  # its passes start after the hits
        seq.prefix_registered = len(hit) == len(seq.prefix_keys or ())
        if seq.stats.preemptions == 0 and seq.prefix_keys is not None:  # a readmission is not a new query
            cache.count_query(seq.prompt_len, seq.cached_prefix_len)

    def _free(self, seq: Sequence) -> None:
        if self.prefix_cache is None:
            self.allocator.free(seq.pages)
        else:
            self.prefix_cache.release(seq.pages)
        seq.pages = []
        seq.cached_prefix_len = 0

    def _register_prefix(self, req: ScheduledRequest) -> None:
        """After a step: once seq's passes have computed all its shareable prompt pages, they join the cache (and
        become read-only for seq too)."""
        seq = req.seq
        keys = seq.prefix_keys
        if self.prefix_cache is None or seq.prefix_registered or not keys:
            return
        end = len(keys) * self.prefix_cache.page_size
        if req.query[1] < end:  # not all computed yet
            return
        h = seq.cached_prefix_len // self.prefix_cache.page_size
        self.prefix_cache.register(keys[h:], seq.pages[h:len(keys)])
        seq.cached_prefix_len, seq.prefix_registered = end, True
