"""A minimal progress bar on stderr."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.n, self.t0 = max(total, 1), label, 0, time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        frac = min(self.n / self.total, 1.0)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        sys.stderr.write(f"\r{self.label:<22} [{bar}] {self.n}/{self.total} {time.perf_counter() - self.t0:6.1f}s")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
