"""The preallocated KV pool: per layer, K and V of shape [num_pages * page_size + 1, Hkv, D].

Slot s of page p is p * page_size + s. The last slot is scratch: writes that must not land anywhere real
(the shift position of a block pass) go there; padded key reads point at it too, so it is zeroed. The rest is left
uninitialised (untouched memory costs nothing until used): every request's first step is a full pass that writes
all of its slots before any block pass reads them.
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .model.attention import KVPoolTensors
from .model.parallel import SINGLE, Shard


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, shard: Shard = SINGLE) -> int:
    """K and V bytes one token takes in this rank's pool (a tensor-parallel rank holds only its KV heads)."""
    k0, k1 = shard.kv_heads(cfg.num_kv_heads)
    return 2 * cfg.num_layers * (k1 - k0) * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


class KVPool:
    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device, shard: Shard = SINGLE) -> None:
        self.num_pages, self.page_size = num_pages, page_size
        slots = num_pages * page_size + 1
        self.scratch_slot = slots - 1
        k0, k1 = shard.kv_heads(cfg.num_kv_heads)
        shape = (slots, k1 - k0, cfg.head_dim)
        self.tensors = KVPoolTensors(
            k=[torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
            v=[torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)])
        for t in (*self.tensors.k, *self.tensors.v):
            t[self.scratch_slot].zero_()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.tensors.k, *self.tensors.v))

    @staticmethod
    def pages_for_memory(cfg: ModelConfig, dtype: torch.dtype, page_size: int, memory_bytes: int,
                         shard: Shard = SINGLE) -> int:
        """Pages that fit in memory_bytes of one rank's pool."""
        return memory_bytes // (kv_bytes_per_token(cfg, dtype, shard) * page_size)
