"""Stop strings over a request's committed text: found incrementally, cut exactly, and held back while streaming.

Blocks complete left to right and a completed block never changes, so the committed text only grows. Each time a
block completes, only the text that could contain a new match is searched (the new text plus max_len - 1
characters before it), with one compiled alternation of every stop string. When one is found, the shortest
token prefix whose text contains it is located by bisection (O(log n) decodes, not one per prefix).

While streaming, text that might still change or be cut is held back, so each streamed text extends the previous
one and the final text extends them all: a trailing incomplete multi-byte character (decoded as U+FFFD) and the
longest tail of the text that is a prefix of some stop string; the streamed text is then the text of the longest
token prefix within what is left, so token_ids and text always agree.
"""
from __future__ import annotations

import re
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class StopStrings:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.max_len = max(len(s) for s in stops)
        self._pattern = re.compile("|".join(re.escape(s) for s in sorted(stops, key=len, reverse=True)))
        self._prefixes = frozenset(s[:k] for s in stops for k in range(1, len(s)))
        """Every proper prefix of every stop string (at most MAX_STOP_STRINGS * MAX_STOP_LENGTH of them)."""

    def find(self, text: str, searched: int = 0) -> int:
        """Start of the first stop string in text, given that text[:searched] was already searched; -1 if none."""
        m = self._pattern.search(text, max(0, searched - self.max_len + 1))
        return m.start() if m else -1

    def held_tail(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string (it may still become one)."""
        for k in range(min(self.max_len - 1, len(text)), 0, -1):
            if text[-k:] in self._prefixes:
                return k
        return 0

    def cut(self, ids: list[int], tokenizer: Any) -> tuple[list[int], str, bool]:
        """Shortest prefix of ids whose text contains a stop string, and the text cut just before it."""
        text = decode(tokenizer, ids)
        at = self.find(text)
        if at < 0:
            return ids, text, False
        lo, hi = 1, len(ids)  # the text of ids[:hi] contains a stop; find the smallest such prefix
        while lo < hi:
            mid = (lo + hi) // 2
            if self.find(decode(tokenizer, ids[:mid])) >= 0:
                hi = mid
            else:
                lo = mid + 1
        return ids[:hi], text[:at], True


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def stream_safe(text: str, stops: StopStrings | None) -> str:
    """The part of a still-growing text that can be streamed: without a trailing incomplete character or a tail
    that could begin a stop string."""
    end = len(text.rstrip(REPLACEMENT_CHAR))
    if stops is not None:
        end -= stops.held_tail(text[:end])
    return text[:end]


def prefix_ids(ids: list[int], text: str, tokenizer: Any) -> list[int]:
    """The longest prefix of ids whose text is a prefix of `text` (bisection over prefixes)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(decode(tokenizer, ids[:mid])):
            lo = mid
        else:
            hi = mid - 1
    return ids[:lo]
