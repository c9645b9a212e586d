"""PageAllocator reuses pages last-in first-out: under any interleaving of allocations and frees, no page id at or
above the peak number of pages simultaneously in use is ever handed out, so the memory the pool's untouched
tensors get backed with is bounded by the peak load (not the whole pool, as FIFO reuse drifts to)."""
from __future__ import annotations

import random

import pytest

from engine.cache_manager import PageAllocator


@pytest.mark.parametrize("seed", range(6))
def test_pages_handed_out_stay_below_peak_usage(seed):
    rng = random.Random(seed)
    num_pages = rng.choice([7, 64, 257])
    a = PageAllocator(num_pages, page_size=rng.choice([1, 4, 16]))
    held: list[list[int]] = []
    peak, touched = 0, set()
    for _ in range(2000):
        if held and (rng.random() < 0.45 or not a.num_free):
            a.free(held.pop(rng.randrange(len(held))))
        else:
            pages = a.allocate(rng.randint(1, min(a.num_free, max(1, num_pages // 8))))
            held.append(pages)
            touched.update(pages)
        assert a.num_used == sum(map(len, held)) and a.num_used + a.num_free == num_pages
        peak = max(peak, a.num_used)
        assert touched == set(range(len(touched))) and len(touched) == peak, (sorted(touched), peak)


def test_fifo_would_touch_the_whole_pool_lifo_does_not():
    """A steady load of one request at a time: LIFO keeps reusing the same pages."""
    a = PageAllocator(100, 16)
    seen = set()
    for _ in range(200):
        pages = a.allocate(3)
        seen.update(pages)
        a.free(pages)
    assert seen == {0, 1, 2}


def test_double_free_is_refused():
    a = PageAllocator(4, 1)
    pages = a.allocate(2)
    a.free(pages)
    with pytest.raises(ValueError, match="freed twice"):
        a.free(pages[:1])
