"""engine/prefix_cache.py and the scheduler's prefix-cache accounting with hand-made sequences (no model), in
the style of vLLM's block-manager tests: page keys of shared prompts, hits, reference counts, LRU eviction, and
a fuzz of random operations checking that every page is free, cached or held, exactly once."""
from __future__ import annotations

import random

import pytest

from engine.cache_manager import PageAllocator
from engine.prefix_cache import PrefixCache, page_keys
from engine.sampling_params import SamplingParams, model_defaults
from engine.scheduler import RunnerOutput, Scheduler, SchedulerConfig
from engine.sequence import Sequence, Status

SYSTEM = list(range(100, 140))  # a 40-token "system prompt"


# page keys --------------------------------------------------------------------------------------------------
def test_shared_full_blocks_give_shared_keys_and_the_chain_breaks_at_the_first_difference():
    B, P = 8, 4
    a = page_keys(SYSTEM + [1, 2, 3], B, P)  # 43 tokens: 5 full blocks -> 10 pages
    b = page_keys(SYSTEM + [7, 8, 9, 10, 11, 12, 13, 14, 15], B, P)  # 49 tokens: 6 full blocks -> 12 pages
    assert len(a) == 10 and len(b) == 12 and a == b[:10]
    c = page_keys(SYSTEM[:20] + [0] + SYSTEM[21:], B, P)  # differs at position 20 (block 2, page 5)
    assert c[:4] == a[:4] and all(x != y for x, y in zip(c[4:], a[4:]))


def test_a_page_key_depends_on_its_whole_block():
    """A page's K/V depend on the tokens after it in its block (full attention inside a block): changing the
    last token of block 0 changes the key of page 0, and of every later page."""
    B, P = 8, 4
    a = page_keys(SYSTEM[:16], B, P)
    b = page_keys(SYSTEM[:7] + [0] + SYSTEM[8:16], B, P)
    assert all(x != y for x, y in zip(a, b))


def test_keys_depend_on_the_block_length():
    assert not set(page_keys(SYSTEM, 8, 4)) & set(page_keys(SYSTEM, 4, 4))


def test_only_pages_inside_full_prompt_blocks_are_keyed():
    assert page_keys(SYSTEM[:7], 8, 4) == []  # no full block
    assert len(page_keys(SYSTEM[:8], 8, 4)) == 2  # a prompt that is exactly one block
    # page size not dividing the block length: 5 full blocks of 8 = 40 positions = 4 whole pages of 9
    keys = page_keys(SYSTEM + [1], 8, 9)
    assert len(keys) == 4
    # page 1 (positions 9..17) straddles blocks 1 and 2: its key follows block 2, so a prompt that shares
    # blocks 0-1 but not block 2 shares page 0 only
    other = page_keys(SYSTEM[:16] + [0] * 24, 8, 9)
    assert other[0] == keys[0] and other[1] != keys[1]
    assert len(page_keys(SYSTEM, 32, 16)) == 2  # one full block of 32 = 2 pages; the tail block is not keyed


# the cache --------------------------------------------------------------------------------------------------
def keys_for(n: int, tag: int = 0) -> list[bytes]:
    return page_keys([tag] * 4 * n, 4, 4)  # n pages, one per block


def test_refcounts_hits_and_release_to_the_lru():
    cache = PrefixCache(PageAllocator(8, 4))
    k = keys_for(3)
    assert cache.match(k) == []
    a = cache.allocate(5)  # 3 prompt pages + 2 private
    cache.register(k, a[:3])
    assert cache.match(k) == a[:3] and cache.match(k[:2]) == a[:2] and cache.match(keys_for(1, 9) + k) == []
    b = cache.allocate(1, hit=a[:3])
    assert b[:3] == a[:3] and [cache.refs(p) for p in a[:3]] == [2, 2, 2]
    assert cache.num_used == 6 and cache.num_free == 2
    cache.release(a)
    assert [cache.refs(p) for p in a[:3]] == [1, 1, 1] and cache.num_free == 4
    cache.release(b)
    assert [cache.refs(p) for p in a[:3]] == [0, 0, 0]
    assert cache.num_free == 8 and cache.num_used == 0 and cache.num_cached == 3  # cached, evictable
    assert cache.match(k) == a[:3]  # still there for the next request
    cache.check()


def test_evictable_hits_are_not_counted_twice():
    cache = PrefixCache(PageAllocator(4, 4))
    k = keys_for(2)
    a = cache.allocate(4)
    cache.register(k, a[:2])
    cache.release(a)  # 2 free + 2 cached evictable
    hit = cache.match(k)
    assert cache.can_allocate(2, hit) and not cache.can_allocate(3, hit)
    pages = cache.allocate(2, hit)
    assert pages[:2] == hit and cache.num_free == 0 and cache.evictions == 0
    cache.check()


def test_lru_eviction_oldest_release_first_and_a_request_tail_first():
    cache = PrefixCache(PageAllocator(6, 4))
    ka, kb = keys_for(3, tag=1), keys_for(3, tag=2)
    a = cache.allocate(3)
    cache.register(ka, a)
    b = cache.allocate(3)
    cache.register(kb, b)
    cache.release(a)  # released first: evicted first, its tail (a[2]) before its head
    cache.release(b)
    assert cache.allocator.num_free == 0
    got = cache.allocate(1)
    assert got == [a[2]] and cache.evictions == 1
    assert cache.match(ka) == a[:2] and cache.match(kb) == b  # a's chain lost only its end
    cache.allocate(2)
    assert cache.match(ka) == [] and cache.match(kb) == b
    cache.allocate(1)
    assert cache.match(kb) == b[:2]
    cache.check()


def test_a_hit_refreshes_recency():
    cache = PrefixCache(PageAllocator(4, 4))
    ka, kb = keys_for(2, 1), keys_for(2, 2)
    a = cache.allocate(2)
    cache.register(ka, a)
    b = cache.allocate(2)
    cache.register(kb, b)
    cache.release(a)
    cache.release(b)
    again = cache.allocate(0, hit=cache.match(ka))  # a is used again, then released: now the most recent
    cache.release(again)
    cache.allocate(2)
    assert cache.match(ka) == a and cache.match(kb) == []


def test_registering_a_key_cached_meanwhile_keeps_the_page_private():
    cache = PrefixCache(PageAllocator(4, 4))
    k = keys_for(1)
    a, b = cache.allocate(1), cache.allocate(1)  # two requests computed the same prefix in one step
    cache.register(k, a)
    cache.register(k, b)
    assert cache.match(k) == a
    cache.release(b)  # private: straight back to the allocator
    assert cache.allocator.num_free == 3 and cache.num_cached == 1
    cache.check()


def test_over_release_and_exhaustion_are_errors():
    cache = PrefixCache(PageAllocator(2, 4))
    k = keys_for(1)
    a = cache.allocate(1)
    cache.register(k, a)
    cache.release(a)
    with pytest.raises(ValueError, match="released more often"):
        cache.release(a)
    cache = PrefixCache(PageAllocator(2, 4))
    cache.allocate(2)
    with pytest.raises(MemoryError, match="exhausted"):
        cache.allocate(1)


def test_fuzz_every_page_is_free_cached_or_held_exactly_once():
    rng = random.Random(0)
    cache = PrefixCache(PageAllocator(24, 4))
    prompts = [[rng.randrange(3) for _ in range(4 * rng.randint(1, 6))] for _ in range(12)]
    held: list[list[int]] = []
    for _ in range(3000):
        if held and (rng.random() < 0.45 or not cache.can_allocate(8)):
            cache.release(held.pop(rng.randrange(len(held))))
        else:
            keys = page_keys(rng.choice(prompts), 4, 4)
            hit = cache.match(keys)
            new = len(keys) - len(hit) + rng.randint(0, 2)
            if not cache.can_allocate(new, hit):
                continue
            pages = cache.allocate(new, hit)
            if rng.random() < 0.8:  # the step computing the prompt ran (else: aborted before it)
                cache.register(keys[len(hit):], pages[len(hit):len(keys)])
            held.append(pages)
        cache.check()
        counts: dict[int, int] = {}
        for pages in held:
            for p in pages:
                counts[p] = counts.get(p, 0) + 1
        for p, n in counts.items():
            assert n == 1 or cache.refs(p) == n, "a page shared by requests must be a cached page held by each"
        assert cache.num_used == len(counts)
        assert cache.num_used + cache.num_free == cache.num_pages
    assert cache.evictions > 0 and cache.num_cached > 0


# the scheduler ----------------------------------------------------------------------------------------------
DEFAULTS = model_defaults("llada2_moe", None)


def make_seq(rid: str, prompt: list[int], **params) -> Sequence:
    """A block-diffusion (LLaDA2) request: block-aligned canvas, the exact block cache unless cache='none'."""
    params.setdefault("block_length", 8)
    params.setdefault("max_tokens", 8)
    return Sequence(rid, list(prompt), SamplingParams(**params).resolve(DEFAULTS), 0, block_causal=True)


class Harness:
    def __init__(self, num_pages: int, page_size: int = 4, **cfg) -> None:
        self.cache = PrefixCache(PageAllocator(num_pages, page_size))
        self.sched = Scheduler(SchedulerConfig(**cfg), self.cache.allocator, self.cache)

    def step(self, rng: random.Random | None = None):
        out = self.sched.schedule()
        if out.scheduled:
            commits = [rng.randint(0, r.seq.masked_in_block) if rng else r.seq.masked_in_block for r in out.scheduled]
            upd = self.sched.update(out, RunnerOutput(commits, [False] * len(out.scheduled)))
            for seq in upd.finished:
                self.sched.finish(seq, "length")
        self.check()
        return out

    def check(self) -> None:
        s, c = self.sched, self.cache
        c.check()
        counts: dict[int, int] = {}
        for seq in s.running:
            assert len(seq.pages) == s.pages_needed(seq) and len(set(seq.pages)) == len(seq.pages)
            for p in seq.pages:
                counts[p] = counts.get(p, 0) + 1
            assert seq.cached_prefix_len % c.page_size == 0
            assert seq.cached_prefix_len <= len(seq.prefix_keys or ()) * c.page_size
            for p, key in zip(seq.pages[:seq.cached_prefix_len // c.page_size], seq.prefix_keys or ()):
                if p in c._key_of:  # a cached page, held, under this request's key
                    assert c.refs(p) >= 1 and c._key_of[p] == key
                else:  # computed by this request while another computed the same prefix: kept private
                    assert seq.prefix_registered
        for p, n in counts.items():
            assert n == 1 or c.refs(p) == n
        assert c.num_used == len(counts) and c.num_used + c.num_free == c.num_pages
        assert all(seq.pages == [] and seq.status is Status.WAITING for seq in s.waiting)


def test_second_request_with_the_system_prompt_skips_it():
    h = Harness(64)
    a = make_seq("a", SYSTEM + [1, 2, 3], max_tokens=24)  # 43 tokens: 5 full blocks of 8 = 10 pages of 4
    h.sched.add(a)
    out = h.step()
    assert a.cached_prefix_len == 40 and a.prefix_registered  # registered after its first step
    assert out.scheduled[0].query == (0, 48)  # the prefix up to the end of the first denoised block
    a_prompt_pages = a.pages[:10]
    b = make_seq("b", SYSTEM + [9] * 5)
    h.sched.add(b)
    used = h.cache.num_used
    out = h.step()
    assert out.scheduled[1].seq is b and out.scheduled[1].query == (40, 48)  # b skips the 40 cached positions
    assert b.cached_prefix_len == 40 and b.cached_upto >= 40 and b.pages[:10] == a_prompt_pages
    assert h.cache.num_used == used + h.sched.pages_needed(b) - 10  # b took only its own pages
    assert (h.cache.queries, h.cache.hits) == (43 + 45, 40)


def test_cache_none_requests_and_short_prompts_do_not_share():
    h = Harness(64)
    for rid in "ab":
        h.sched.add(make_seq(rid, SYSTEM, cache="none"))
    h.sched.add(make_seq("c", SYSTEM[:5]))
    h.sched.add(make_seq("d", SYSTEM[:5]))
    h.step()
    h.step()
    assert all(s.cached_prefix_len == 0 for s in h.sched.running) and h.cache.hits == 0
    assert h.cache.queries == 10  # c and d were looked up (nothing to share), a and b were not


def test_eviction_under_a_small_pool_lets_every_request_finish():
    """Pool of 16 pages: each request needs 14 (41-42 prompt tokens + 8, rounded up to blocks of 8); finished
    requests leave their 10 prompt pages cached, and new prompts evict them (least recently used, a request's tail
    pages first) to get pages."""
    h = Harness(16, max_num_seqs=4)
    seqs = [make_seq(f"r{i}", [i] * 40 + [1, 2]) for i in range(5)]
    later = [make_seq("again", [0] * 40 + [5]),  # r0's prompt: evicted by then
             make_seq("again4", [4] * 40 + [7])]  # r4's prompt: partly cached when it arrives
    for batch in (seqs, later):
        for s in batch:
            h.sched.add(s)
        for _ in range(200):
            if not h.sched.has_unfinished():
                break
            h.step()
    assert all(s.finished for s in seqs + later)
    assert h.cache.evictions > 0
    # r0's pages were evicted long before "again"; r4's first 2 pages survived "again"'s evictions (it took 4 free
    # pages and evicted 10: r3's 2 survivors, then r4's tail first): again4 hits them
    assert h.cache.hits == 8
    assert h.cache.num_used == 0 and h.cache.num_free == 16


def test_preemption_releases_shared_pages_and_readmission_hits_again():
    h = Harness(24, preempt_after_steps=1, max_num_seqs=8)
    a = make_seq("a", SYSTEM + [1], max_tokens=16)  # canvas 64: 16 pages
    h.sched.add(a)
    h.step()
    b = make_seq("b", SYSTEM + [2], max_tokens=24)  # canvas 72: 18 pages, 10 shared
    h.sched.add(b)
    h.step()
    na = h.sched.pages_needed(a)
    assert b.cached_prefix_len == 40 and h.cache.num_free == 24 - na - (h.sched.pages_needed(b) - 10)
    q = h.cache.queries
    h.sched.preempt(b)
    h.check()
    assert h.cache.num_free == 24 - na and h.cache.queries == q and b.cached_upto == 0
    h.step()  # b comes back, finds its prefix cached (held by a)
    assert b.status is Status.RUNNING and b.cached_prefix_len == 40 and h.cache.queries == q


def test_fuzz_scheduler_with_shared_prompts():
    rng = random.Random(1)
    h = Harness(14, max_num_seqs=6, preempt_after_steps=2)
    systems = [[rng.randrange(50) for _ in range(16)] for _ in range(3)]
    n = 0
    for _ in range(1500):
        if rng.random() < 0.3:
            prompt = rng.choice(systems)[:rng.randint(0, 16)] + [rng.randrange(50) for _ in range(rng.randint(1, 9))]
            g = rng.choice([4, 8, 16, 24])
            h.sched.add(make_seq(f"r{n}", prompt, max_tokens=g, block_length=4, cache=rng.choice(["none", "block"])))
            n += 1
        if rng.random() < 0.05 and h.sched.running:
            h.sched.finish(rng.choice(h.sched.running), "abort")
            h.check()
        h.step(rng)
    assert h.cache.hits > 0 and h.cache.evictions > 0 and h.sched.num_preemptions > 0
