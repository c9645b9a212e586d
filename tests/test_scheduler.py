"""Scheduler policies with fake runner outputs (no model): batch limit, token budget, FCFS admission, aborts,
preemption, and a fuzz of random operations checking the page accounting after every one."""
from __future__ import annotations

import random

import pytest

from engine.cache_manager import PageAllocator
from engine.errors import RequestTooLargeError
from engine.decoding.transfer.llada import llada_count
from engine.sampling_params import GenerationDefaults, SamplingParams
from engine.scheduler import RunnerOutput, ScheduleOutput, Scheduler, SchedulerConfig, UpdateResult
from engine.sequence import Sequence, Status

DEFAULTS = GenerationDefaults()


def make_seq(rid: str, prompt_len: int, shift: int = 0, **params) -> Sequence:
    return Sequence(rid, list(range(1, prompt_len + 1)), SamplingParams(**params).resolve(DEFAULTS), shift)


def commit_count(seq: Sequence, rng: random.Random | None = None) -> int:
    """What a runner could commit this step: LLaDA's even schedule (any count under rng); adaptive rows commit
    at least one and everything at their last allowed step."""
    masked = seq.masked_in_block
    if seq.params.adaptive:
        if seq.is_last_allowed_step or masked == 0:
            return masked
        return rng.randint(1, masked) if rng else 1
    if rng is not None:
        return rng.randint(0, masked)
    return min(llada_count(seq.block_masks, seq.block_steps, seq.step_in_block), masked)


class Harness:
    """The scheduler driven the way LLMEngine drives it, with a fake runner."""

    def __init__(self, num_pages: int, page_size: int = 4, **cfg) -> None:
        self.alloc = PageAllocator(num_pages, page_size)
        self.sched = Scheduler(SchedulerConfig(**cfg), self.alloc)
        self.stolen: list[int] = []
        """Pages taken from the pool behind the scheduler's back (memory pressure from another consumer)."""
        self.finished: list[Sequence] = []

    def add(self, seq: Sequence) -> Sequence:
        self.sched.add(seq)
        return seq

    def step(self, rng: random.Random | None = None, eos: set[str] = frozenset()) -> tuple[ScheduleOutput, UpdateResult]:
        out = self.sched.schedule()
        self.check(out)
        upd = UpdateResult()
        if out.scheduled:
            upd = self.sched.update(out, RunnerOutput([commit_count(r.seq, rng) for r in out.scheduled],
                                                      [r.seq.request_id in eos for r in out.scheduled]))
            for seq in upd.finished:
                self.sched.finish(seq, "length")
                self.finished.append(seq)
        self.check()
        return out, upd

    def abort(self, seq: Sequence) -> None:
        self.sched.finish(seq, "abort")
        self.check()

    def run_to_end(self, limit: int = 100_000) -> None:
        for _ in range(limit):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("requests never finished")

    def check(self, out: ScheduleOutput | None = None) -> None:
        s, a = self.sched, self.alloc
        held = [p for seq in s.running for p in seq.pages]
        assert len(held) == len(set(held)), "a page is held twice"
        assert not set(held) & set(self.stolen)
        assert a.num_used == len(held) + len(self.stolen)
        assert a.num_used + a.num_free == a.num_pages
        assert all(seq.pages == [] and seq.status is Status.WAITING for seq in s.waiting)
        assert all(len(seq.pages) == s.pages_needed(seq) and seq.status is Status.RUNNING for seq in s.running)
        assert len(s.running) <= s.cfg.max_num_seqs
        assert [q.arrival for q in s.running] == sorted(q.arrival for q in s.running)
        assert [q.arrival for q in s.waiting] == sorted(q.arrival for q in s.waiting)
        if out is not None:  # right after schedule(), before the update
            if s.running:
                assert out.scheduled and out.scheduled[0].seq is s.running[0], "the oldest always runs"
            assert len(out.scheduled) <= 1 or out.num_tokens <= s.cfg.max_num_batched_tokens
            assert out.num_tokens == sum(r.seq.step_cost() for r in out.scheduled)
            for r in out.scheduled:
                assert r.seq.status is Status.RUNNING
                assert r.refresh == (r.seq.params.cache == "none" or r.seq.step_in_block == 0)
                assert r.block == r.seq.block_bounds() and r.query == r.seq.query_range()
            for victim in out.preempted:
                assert victim.status is Status.WAITING or victim in out.admitted
                assert any(a.arrival < victim.arrival for a in out.admitted), "preempted only for an older request"


def test_max_num_seqs_limits_the_running_set():
    h = Harness(1000, max_num_seqs=2)
    seqs = [h.add(make_seq(f"r{i}", 5, max_tokens=8 * (i + 1), steps=8 * (i + 1), block_length=4))
            for i in range(5)]
    out, _ = h.step()
    assert out.admitted == seqs[:2] and out.seqs == seqs[:2] and h.sched.waiting == seqs[2:]
    while not seqs[0].finished:
        h.step()
    out, _ = h.step()
    assert out.admitted == [seqs[2]] and len(h.sched.running) == 2
    h.run_to_end()
    assert all(s.finished for s in seqs) and h.alloc.num_used == 0


def test_token_budget_holds_newer_requests_back_but_the_oldest_always_runs():
    # cache none: every step costs the whole canvas (5 + 15 = 20 positions)
    h = Harness(1000, max_num_batched_tokens=10)
    a, b = (h.add(make_seq(n, 5, max_tokens=15, steps=15, block_length=5)) for n in "ab")
    out, _ = h.step()
    assert out.seqs == [a] and out.num_tokens == 20  # over budget, but the oldest always runs
    h.sched.cfg.max_num_batched_tokens = 45
    c = h.add(make_seq("c", 2, max_tokens=4, steps=4, block_length=4))  # costs 6
    out, _ = h.step()
    assert out.seqs == [a, b] and out.num_tokens == 40  # c (6) does not fit in the 5 left
    h.sched.cfg.max_num_batched_tokens = 30
    out, _ = h.step()
    assert out.seqs == [a, c] and out.num_tokens == 26  # b (20) does not fit after a; the younger c does
    h.run_to_end()
    assert all(s.finished for s in (a, b, c)) and h.alloc.num_used == 0


def test_cached_step_costs_refresh_then_block():
    h = Harness(1000, max_num_batched_tokens=1 << 20)
    dual = h.add(make_seq("dual", 10, shift=1, max_tokens=8, steps=8, block_length=4, cache="dual"))
    prefix = h.add(make_seq("prefix", 10, max_tokens=8, steps=8, block_length=4, cache="prefix", cfg_scale=1.0))
    out, _ = h.step()
    assert [(r.refresh, r.query, r.block) for r in out.scheduled] == [(True, (0, 18), (10, 14)),
                                                                       (True, (0, 18), (10, 14))]
    assert out.num_tokens == 18 + 2 * 18  # the CFG twin doubles the cost
    out, _ = h.step()
    assert [(r.refresh, r.query) for r in out.scheduled] == [(False, (9, 14)), (False, (10, 18))]
    assert out.num_tokens == 5 + 2 * 8
    h.run_to_end()
    assert dual.finished and prefix.finished and h.alloc.num_used == 0


def test_backfill_then_preemption_guards_the_blocked_head():
    """The head waits for pages; younger requests that fit start meanwhile (backfill). Once the head has waited
    preempt_after_steps, backfill stops, and when the older request finishes the youngest backfilled request is
    preempted (it is at a safe point) so the head fits. The older request is never preempted."""
    h = Harness(8, page_size=4, preempt_after_steps=2)
    a = h.add(make_seq("a", 4, max_tokens=12, steps=12, block_length=4))  # 4 pages, 12 steps
    b = h.add(make_seq("b", 4, max_tokens=20, steps=20, block_length=4))  # 6 pages: blocked
    c = h.add(make_seq("c", 1, max_tokens=7, steps=28, block_length=7))  # 2 pages: backfill
    d = h.add(make_seq("d", 1, max_tokens=7, steps=28, block_length=7))  # 2 pages: backfill
    out, _ = h.step()
    assert out.admitted == [a, c, d] and b.status is Status.WAITING
    late = h.add(make_seq("late", 1, max_tokens=2, steps=2, block_length=2))  # 1 page, but the head is starving
    preempted = []
    while not b.status is Status.RUNNING:
        out, _ = h.step()
        preempted += out.preempted
        assert late.status is Status.WAITING, "no backfill past a starving head"
        assert a.status is not Status.WAITING, "older requests are never preempted"
    assert a.finished and preempted == [d] and out.admitted == [b]
    assert d.status is Status.WAITING and d.stats.preemptions == 1 and c.status is Status.RUNNING
    h.run_to_end()
    assert all(s.finished for s in (a, b, c, d, late)) and h.alloc.num_used == 0
    assert d.stats.steps == 28 and b.stats.steps == 20  # nothing redone, nothing skipped


def test_no_useless_preemption_when_it_would_not_make_the_head_fit():
    h = Harness(10, page_size=4, preempt_after_steps=3)
    a = h.add(make_seq("a", 4, max_tokens=20, steps=20, block_length=4))  # 6 pages
    b = h.add(make_seq("b", 4, max_tokens=20, steps=20, block_length=4))  # 6 pages: waits for a
    c = h.add(make_seq("c", 1, max_tokens=2, steps=2, block_length=2))  # 1 page: backfills, done in 2 steps
    h.run_to_end()
    assert h.sched.num_preemptions == 0  # nothing younger than b could ever free 6 pages while a runs
    assert h.finished == [c, a, b] and h.alloc.num_used == 0


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_abort_frees_pages_at_once_waiting_running_or_mid_block(cache):
    h = Harness(12, page_size=4)
    kw = dict(max_tokens=12, steps=12, block_length=4, cache=cache)
    run = h.add(make_seq("run", 4, **kw))  # 4 pages
    twin = h.add(make_seq("twin", 4, cfg_scale=2.0, **kw))  # 8 pages: canvas + CFG twin
    wait = h.add(make_seq("wait", 4, **kw))
    h.step()
    h.step()  # now mid-block (dual: step 2 was a block pass against the K/V of step 1)
    assert run.step_in_block == 2 and twin.step_in_block == 2 and wait.status is Status.WAITING
    assert h.alloc.num_used == 12
    h.abort(wait)  # waiting: leaves the queue, holds nothing
    assert wait.finish_reason == "abort" and wait not in h.sched.waiting and h.alloc.num_used == 12
    late = h.add(make_seq("late", 4, **kw))
    h.abort(twin)  # running, mid-block: both halves freed now
    assert twin.pages == [] and twin.status is Status.FINISHED and h.alloc.num_used == 4
    out, _ = h.step()
    assert out.admitted == [late]
    h.abort(run)
    h.abort(late)
    assert h.alloc.num_used == 0 and not h.sched.has_unfinished()
    h.abort(run)  # aborting twice is harmless
    assert h.alloc.num_used == 0


def test_preemption_of_younger_requests_at_safe_points():
    """Auto-preemption needs a waiting request older than a running one. FCFS admission alone never produces
    that (see the test above); here the oldest request is preempted by hand (an external eviction) and pages are
    taken from the pool behind the scheduler's back, so it cannot be readmitted: after preempt_after_steps
    blocked steps the younger running requests at safe points are preempted, youngest first; a cached request in
    the middle of a block is not touched until its block completes."""
    h = Harness(16, page_size=4, preempt_after_steps=3)
    kw = dict(max_tokens=12, steps=12, block_length=4)
    old = h.add(make_seq("old", 4, **kw))  # 4 pages each
    mid = h.add(make_seq("mid", 4, cache="dual", **kw))
    young = h.add(make_seq("young", 4, cache="dual", **kw))
    youngest = h.add(make_seq("youngest", 4, cache="none", **kw))
    h.step()
    assert h.alloc.num_used == 16 and all(s.step_in_block == 1 for s in (old, mid, young, youngest))
    h.sched.preempt(old)
    h.stolen += h.alloc.allocate(4)  # another consumer grabs the freed pages
    h.check()
    for _ in range(2):  # blocked, but not for preempt_after_steps steps yet
        out, _ = h.step()
        assert out.preempted == [] and old.status is Status.WAITING and out.seqs == [mid, young, youngest]
    out, _ = h.step()  # third blocked step: preempt youngest first (cache none: always at a safe point)
    assert out.preempted == [youngest] and out.admitted == [old] and out.seqs == [old, mid, young]
    assert youngest.status is Status.WAITING and youngest.pages == [] and youngest.stats.preemptions == 1
    assert h.sched.waiting == [youngest] and mid.status is Status.RUNNING and young.status is Status.RUNNING
    progress = (youngest.block_idx, youngest.step_in_block)
    h.step()
    assert youngest.status is Status.WAITING and (youngest.block_idx, youngest.step_in_block) == progress
    h.alloc.free(h.stolen)
    h.stolen.clear()
    out, _ = h.step()
    assert out.admitted == [youngest]  # readmitted as soon as the pages are back, where it left off
    h.run_to_end()
    assert all(s.finished for s in (old, mid, young, youngest)) and h.alloc.num_used == 0
    assert all(s.stats.steps == 12 for s in (old, mid, young, youngest))  # nothing redone, nothing skipped
    assert h.sched.num_preemptions == 2  # the manual one and youngest


def test_cached_requests_wait_for_their_block_boundary_before_preemption():
    h = Harness(12, page_size=4, preempt_after_steps=1)
    kw = dict(max_tokens=12, steps=12, block_length=4)
    old = h.add(make_seq("old", 4, **kw))
    young = h.add(make_seq("young", 4, cache="prefix", **kw))
    younger = h.add(make_seq("younger", 4, cache="dual", **kw))
    h.step()  # everyone at step 1 of block 0
    h.sched.preempt(old)
    h.stolen += h.alloc.allocate(4)
    preempted_at = {}
    for _ in range(3):
        out, _ = h.step()
        for s in out.preempted:
            preempted_at[s.request_id] = (s.block_idx, s.step_in_block)
        if out.preempted:
            break
    # needs 4 pages: one cached victim; both are mid-block for steps 2..3, at block 1 step 0 after step 4
    assert not preempted_at
    out, _ = h.step()
    assert [s.request_id for s in out.preempted] == ["younger"]  # youngest first, exactly enough
    assert (younger.block_idx, younger.step_in_block) == (1, 0) and out.admitted == [old]
    assert young.status is Status.RUNNING
    h.alloc.free(h.stolen)
    h.stolen.clear()
    out, _ = h.step()
    assert out.admitted == [younger] and out.scheduled[-1].refresh  # back at its block boundary: a refresh pass
    h.run_to_end()
    assert h.alloc.num_used == 0 and all(s.finished for s in (old, young, younger))
    assert all(s.stats.steps == 12 for s in (old, young, younger))


def test_fuzz_page_accounting():
    rng = random.Random(20240607)
    h = Harness(24, page_size=4, max_num_seqs=6, max_num_batched_tokens=120, preempt_after_steps=3)
    live: list[Sequence] = []
    n_ops = {"add": 0, "step": 0, "abort": 0, "preempt": 0, "steal": 0}
    for i in range(10000):
        op = rng.choices(["add", "step", "abort", "preempt", "steal"], [22, 60, 8, 4, 6])[0]
        live = [s for s in live if not s.finished]
        if op == "add" and len(live) < 24:
            block = rng.choice([1, 2, 3, 4, 8])
            gen = rng.randint(1, 24)
            kw = dict(max_tokens=gen, block_length=block, steps=rng.randint(1, gen + 2),
                      cache=rng.choice(["none", "prefix", "dual"]), cfg_scale=rng.choice([0.0, 0.0, 1.5]),
                      ignore_eos=rng.random() < 0.3)
            if rng.random() < 0.3:
                kw["threshold"] = rng.choice([0.1, 0.9])
            seq = make_seq(f"r{i}", rng.randint(1, 30), shift=rng.randint(0, 1), **kw)
            if h.sched.pages_needed(seq) > h.alloc.num_pages:
                with pytest.raises(RequestTooLargeError):  # a request fault (HTTP 400), not MemoryError
                    h.add(seq)
                continue
            live.append(h.add(seq))
        elif op == "step":
            eos = {s.request_id for s in h.sched.running if rng.random() < 0.02}
            h.step(rng, eos)
        elif op == "abort" and live:
            h.abort(rng.choice(live))
        elif op == "preempt":
            safe = [s for s in h.sched.running if s.at_safe_point]
            if not safe:
                continue
            h.sched.preempt(rng.choice(safe))
            h.check()
        elif op == "steal":
            if h.stolen and rng.random() < 0.5:
                h.alloc.free(h.stolen)
                h.stolen.clear()
            elif h.alloc.num_free:
                h.stolen += h.alloc.allocate(rng.randint(1, min(8, h.alloc.num_free)))
            h.check()
        else:
            continue
        n_ops[op] += 1
    h.alloc.free(h.stolen)
    h.stolen.clear()
    h.run_to_end()
    assert not h.sched.has_unfinished() and h.alloc.num_used == 0
    assert all(s.finished for s in live)
    assert h.sched.num_preemptions > n_ops["preempt"], "the fuzz never reached automatic preemption"
    assert min(n_ops.values()) > 50, n_ops
