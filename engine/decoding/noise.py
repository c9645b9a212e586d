"""Counter-based uniform noise: u = hash(seed, step, position, column).

Each request's noise depends only on its own seed, its step counter and the canvas position, never on what it is
batched with, so seeded sampling gives the same tokens alone or in any batch. float64, in (0, 1).
"""
from __future__ import annotations

import torch

_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64
_M2 = -7723592293110705685  # 0x94D049BB133111EB as int64
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser (int64 arithmetic wraps)."""
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def row_keys(seed: torch.Tensor, step: torch.Tensor, pos: torch.Tensor, stream: int) -> torch.Tensor:
    """seed/step/pos [N] int64 -> [N] int64 keys; `stream` separates independent uses."""
    z = _mix(seed * _GOLDEN + stream)
    z = _mix(z + step * _GOLDEN)
    return _mix(z + pos * _GOLDEN)


def uniform(keys: torch.Tensor, width: int | None = None, start: int = 0) -> torch.Tensor:
    """keys [N] -> [N] (width None) or [N, width] float64 uniforms in (0, 1) for columns start..start + width - 1
    (a vocabulary shard draws exactly its columns of the full row)."""
    z = keys if width is None else keys[:, None] + torch.arange(start, start + width, device=keys.device) * _GOLDEN
    z = _mix(z)
    return (_shr(z, 11).double() + 0.5) * (1.0 / (1 << 53))


STREAM_GUMBEL, STREAM_RANDOM_SCORE, STREAM_ORIGIN, STREAM_ALG_TEMP = 1, 2, 3, 4
