"""Counter-based uniform noise: u = hash(seed, step, position, column); the hash lives in kernels/counter_hash.py.

Each request's noise depends only on its own seed, its step counter and the canvas position, never on what it is
batched with, so seeded sampling gives the same tokens alone or in any batch. float64, in (0, 1).
"""
from __future__ import annotations

from kernels.counter_hash import mix, row_keys, uniform

__all__ = ["mix", "row_keys", "uniform", "STREAM_GUMBEL", "STREAM_RANDOM_SCORE", "STREAM_ORIGIN", "STREAM_ALG_TEMP"]

STREAM_GUMBEL, STREAM_RANDOM_SCORE, STREAM_ORIGIN, STREAM_ALG_TEMP = 1, 2, 3, 4
