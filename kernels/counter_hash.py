"""The counter-based hash behind every random draw of the decoders: u = hash(seed, step, position, column).

The one home of the hash (splitmix64's finaliser over int64 counters), below both engine/ and kernels/:
- `mix`, `row_keys`, `uniform`: the torch version (engine/decoding/noise.py draws with it; the references too);
- `mix_tl`, `uniform_tl`: the same arithmetic as Triton device functions (kernels/vocab.py recomputes the Gumbel noise
  in-kernel), defined only when Triton is importable.
Both produce bit-identical float64 uniforms in (0, 1): int64 arithmetic wraps as uint64 does, and the logical right
shift is emulated on int64 with a mask.
"""
from __future__ import annotations

import torch

M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
GOLDEN = 0x9E3779B97F4A7C15
"""splitmix64's multipliers and the golden-ratio increment, as unsigned 64-bit values."""


def _as_int64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_M1, _M2, _GOLDEN = _as_int64(M1), _as_int64(M2), _as_int64(GOLDEN)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 (multiplication wraps)."""
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def row_keys(seed: torch.Tensor, step: torch.Tensor, pos: torch.Tensor, stream: int) -> torch.Tensor:
    """seed/step/pos [N] int64 -> [N] int64 keys; `stream` separates independent uses."""
    z = mix(seed * _GOLDEN + stream)
    z = mix(z + step * _GOLDEN)
    return mix(z + pos * _GOLDEN)


def uniform(keys: torch.Tensor, width: int | None = None, start: int = 0) -> torch.Tensor:
    """keys [N] -> [N] (width None) or [N, width] float64 uniforms in (0, 1) for columns start..start + width - 1
    (a vocabulary shard draws exactly its columns of the full row)."""
    z = keys if width is None else keys[:, None] + torch.arange(start, start + width, device=keys.device) * _GOLDEN
    z = mix(z)
    return (_shr(z, 11).double() + 0.5) * (1.0 / (1 << 53))


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the torch version above is all they need
    triton = None

if triton is not None:
    _M1_TL: tl.constexpr = tl.constexpr(M1)
    _M2_TL: tl.constexpr = tl.constexpr(M2)
    _GOLDEN_TL: tl.constexpr = tl.constexpr(GOLDEN)

    @triton.jit
    def mix_tl(z):
        """`mix` on uint64 (wrapping multiply, logical shifts)."""
        z = (z ^ (z >> 30)) * _M1_TL
        z = (z ^ (z >> 27)) * _M2_TL
        return z ^ (z >> 31)

    @triton.jit
    def uniform_tl(key, cols):
        """`uniform(keys, ...)` of one row: key uint64, cols [BV] int -> [BV] float64 in (0, 1)."""
        h = mix_tl(key + cols.to(tl.uint64) * _GOLDEN_TL)
        return ((h >> 11).to(tl.float64) + 0.5) * (1.0 / 9007199254740992.0)
