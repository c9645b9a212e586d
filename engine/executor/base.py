"""The executor interface: the runner hands it one ForwardBatch per step; it runs it on every rank holding the
model and hands rank 0 the logits (or the vocabulary shards' statistics)."""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..forward_batch import Consume, ForwardBatch
from ..model.attention import KVPoolTensors


class Executor(Protocol):
    world_size: int
    """Ranks (processes) that hold a share of the model."""

    def run(self, batch: ForwardBatch, kv: KVPoolTensors | None, consume: Consume | None = None,
            forward: Callable[[ForwardBatch], torch.Tensor] | None = None) -> torch.Tensor | None:
        """run_batch on every rank; see engine/forward_batch.run_batch. `forward` (a captured CUDA graph) only
        where world_size is 1."""

    def init_pool(self, num_pages: int, page_size: int) -> None:
        """Allocate the other ranks' shares of the KV pool (rank 0's is the engine's own KVPool)."""

    def check(self) -> None:
        """Raise ParallelError if the model can no longer run (a lost worker)."""

    @property
    def healthy(self) -> bool:
        """check() would not raise."""

    def memory_report(self, pool_bytes: int) -> list[dict[str, int]]:
        """One entry per rank: rank, param_bytes, kv_pool_bytes, rss_bytes (rank 0's pool is pool_bytes)."""

    def shutdown(self) -> None:
        """Stop the other ranks (idempotent)."""
