"""KV page allocator: exact accounting of a fixed pool of pages. Plain Python, no torch."""
from __future__ import annotations

from collections import deque


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"KV pool needs at least one page of at least one slot (pages={num_pages}, "
                             f"page_size={page_size})")
        self.num_pages, self.page_size = num_pages, page_size
        self._free: deque[int] = deque(range(num_pages))
        self._used: set[int] = set()

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list[int]:
        if num_pages > len(self._free):
            raise MemoryError(f"KV pool exhausted: {num_pages} pages requested, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(num_pages)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p not in self._used:
                raise ValueError(f"KV page {p} freed twice or never allocated")
            self._used.remove(p)
            self._free.append(p)
