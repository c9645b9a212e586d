"""KV page allocator: exact accounting of a fixed pool of pages. Plain Python, no torch.

Free pages are reused last-in first-out: the pages a finished request just returned are the next ones handed out.
The pool's tensors are allocated uninitialised, so the operating system only backs the pages that have been
written; with LIFO reuse that is the peak number of pages ever in use at once, and resident memory stays flat
under a steady load instead of creeping towards the whole pool as first-in first-out reuse would make it.
"""
from __future__ import annotations


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"KV pool needs at least one page of at least one slot (pages={num_pages}, "
                             f"page_size={page_size})")
        self.num_pages, self.page_size = num_pages, page_size
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        """A stack: the top (end) is handed out next; page 0 first on a fresh pool."""
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
        pages = [self._free.pop() for _ in range(num_pages)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in reversed(pages):  # the request's first page ends on top of the stack
            if p not in self._used:
                raise ValueError(f"KV page {p} freed twice or never allocated")
            self._used.remove(p)
            self._free.append(p)
