"""Prompt-prefix reuse across requests for block-causal models: content-addressed, reference-counted KV pages,
evicted least-recently-used when the pool needs pages. Plain Python, no torch.

Why only block-causal families: with attention full inside a block and causal across blocks, the K/V of a prompt
block depends only on the tokens of that block and of the blocks before it, so two requests whose prompts start
with the same full blocks compute the same K/V there. (Bidirectional families' K/V depend on the whole canvas:
they never share.) Only FULL prompt blocks qualify: the block holding the prompt's tail also holds [MASK]
positions its prompt tokens attend to.

Keys. Block i of a prompt has the chained digest h_i = H(h_{i-1}, tokens of block i), rooted at H(block_length):
equal digests mean equal prefixes (128-bit BLAKE2b, so a collision is not a practical concern) under the same mask.
The pool's unit is a page of `page_size` slots, which need not divide the block length, so the cache shares PAGES:
page j of the prompt is shareable when it lies entirely inside the full prompt blocks, and its key is
H(h_b, j) where b is the block holding the page's last position (the page's K/V depend on exactly the blocks
0..b). With block_length a multiple of page_size that is block_length / page_size pages per block; otherwise a
page that straddles two blocks is keyed by the later one. A request whose prompt starts with cached pages
(the longest run of consecutive key hits) takes them into its block table and skips computing those positions.

Life cycle of a page:
- private: allocated to one request, not (yet) in the cache; freed to the allocator when the request ends;
- cached: its K/V are known to match its key (registered by `register` after the step that computed them); held
  by `refs` requests; when the last holder ends it stays cached but evictable, in LRU order (a request's pages
  are released tail first, so the end of a chain is evicted before its start);
- evicted: taken back (key dropped) when an allocation needs more pages than the allocator has free.
A cached page is never written: a request's passes write only positions past its cached prefix.

Counters follow vLLM's prefix-cache metrics, in tokens: `queries` adds the prompt length of every request looked up
(first admission only: a preempted request's readmission is not a new query), `hits` the tokens found cached.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Sequence as Seq

from .cache_manager import PageAllocator


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p)
    return h.digest()


def block_digests(token_ids: Seq[int], block_len: int, num_blocks: int) -> list[bytes]:
    """Chained digests of the first num_blocks full blocks: h_i = H(h_{i-1}, tokens of block i)."""
    parent = _digest(b"unmask-block-causal", struct.pack("<q", block_len))
    out = []
    for i in range(num_blocks):
        block = token_ids[i * block_len:(i + 1) * block_len]
        parent = _digest(parent, struct.pack(f"<{len(block)}q", *block))
        out.append(parent)
    return out


def page_keys(token_ids: Seq[int], block_len: int, page_size: int) -> list[bytes]:
    """Keys of the prompt's shareable pages, in order: the pages that lie inside its full blocks."""
    full = len(token_ids) // block_len  # full prompt blocks
    pages = full * block_len // page_size  # pages entirely inside them
    if pages == 0:
        return []
    blocks = block_digests(token_ids, block_len, full)
    return [_digest(blocks[((j + 1) * page_size - 1) // block_len], struct.pack("<q", j)) for j in range(pages)]


class PrefixCache:
    """The KV pages of prompt prefixes, shared between requests, on top of a PageAllocator."""

    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size
        self._page_of: dict[bytes, int] = {}
        """Key -> cached page."""
        self._key_of: dict[int, bytes] = {}
        """Cached page -> its key."""
        self._refs: dict[int, int] = {}
        """Cached page -> requests holding it (0: evictable, then also in _lru)."""
        self._lru: OrderedDict[int, None] = OrderedDict()
        """Cached pages nobody holds, least recently released first."""
        self.queries = 0
        """Prompt tokens looked up (vLLM's prefix_cache_queries)."""
        self.hits = 0
        """Prompt tokens found cached (vLLM's prefix_cache_hits)."""
        self.evictions = 0

    # accounting ---------------------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def num_free(self) -> int:
        """Pages an allocation can get: free in the allocator, plus cached pages nobody holds (evictable)."""
        return self.allocator.num_free + len(self._lru)

    @property
    def num_used(self) -> int:
        """Pages held by requests (cached pages nobody holds count as free)."""
        return self.allocator.num_used - len(self._lru)

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    def refs(self, page: int) -> int:
        """Requests holding a cached page (0 when evictable); raises KeyError for a page not in the cache."""
        return self._refs[page]

    # lookup and allocation ----------------------------------------------------------------------------
    def match(self, keys: Seq[bytes]) -> list[int]:
        """The cached pages of the longest run of leading keys found. No side effects."""
        pages = []
        for k in keys:
            p = self._page_of.get(k)
            if p is None:
                break
            pages.append(p)
        return pages

    def can_allocate(self, num_new: int, hit: Seq[int] = ()) -> bool:
        """Whether `num_new` fresh pages can be had while also taking the cached pages `hit` (some of which may
        be evictable themselves, and then are no longer available to evict)."""
        taken = sum(1 for p in hit if self._refs[p] == 0)
        return num_new <= self.num_free - taken

    def allocate(self, num_new: int, hit: Seq[int] = ()) -> list[int]:
        """Take the cached pages `hit` (one more holder each) and `num_new` private pages, evicting least-recently
        used cached pages when the allocator runs short. Returns hit + new, in that order."""
        if not self.can_allocate(num_new, hit):
            raise MemoryError(f"KV pool exhausted: {num_new} pages requested, {self.num_free} free or evictable")
        for p in hit:
            if self._refs[p] == 0:
                del self._lru[p]
            self._refs[p] += 1
        short = num_new - self.allocator.num_free
        if short > 0:
            self._evict(short)
        return list(hit) + self.allocator.allocate(num_new)

    def _evict(self, n: int) -> None:
        victims = []
        for _ in range(n):
            p, _ = self._lru.popitem(last=False)
            del self._page_of[self._key_of.pop(p)]
            del self._refs[p]
            victims.append(p)
        self.evictions += n
        self.allocator.free(victims)

    def register(self, keys: Seq[bytes], pages: Seq[int]) -> None:
        """Pages whose K/V were just computed for `keys` join the cache, held by the request that computed them.
        A key already cached (another request computed the same prefix meanwhile) keeps its page; this one stays
        private."""
        for k, p in zip(keys, pages):
            if k in self._page_of or p in self._key_of:
                continue
            self._page_of[k], self._key_of[p], self._refs[p] = p, k, 1

    def release(self, pages: Seq[int]) -> None:
        """A request is done with its pages: private ones go back to the allocator, cached ones lose a holder and,
        when nobody holds them, become evictable (the request's last pages are evicted first)."""
        private = []
        for p in reversed(pages):
            if p in self._key_of:
                self._refs[p] -= 1
                if self._refs[p] == 0:
                    self._lru[p] = None
                elif self._refs[p] < 0:
                    raise ValueError(f"KV page {p} released more often than taken")
            else:
                private.append(p)
        self.allocator.free(private[::-1])

    def reclaimable(self, page_lists: Seq[Seq[int]]) -> int:
        """Pages that releasing all of `page_lists` (several requests) would make available."""
        drop: dict[int, int] = {}
        n = 0
        for pages in page_lists:
            for p in pages:
                if p in self._key_of:
                    drop[p] = drop.get(p, 0) + 1
                else:
                    n += 1
        return n + sum(1 for p, d in drop.items() if d >= self._refs[p])

    def count_query(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.queries += prompt_tokens
        self.hits += hit_tokens

    def check(self) -> None:
        """Internal consistency (tests): the maps agree, evictable pages are exactly those nobody holds, and
        every page is free, cached or private exactly once."""
        assert len(self._page_of) == len(self._key_of) == len(self._refs)
        assert all(self._page_of[k] == p for p, k in self._key_of.items())
        assert set(self._lru) == {p for p, r in self._refs.items() if r == 0}
        assert all(r >= 0 for r in self._refs.values())
        assert set(self._key_of) <= self.allocator._used
