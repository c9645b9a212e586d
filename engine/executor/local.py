"""LocalExecutor: one process holds the whole model, so a step is run_batch on it directly."""
from __future__ import annotations

from typing import Callable

import torch

from ..forward_batch import Consume, ForwardBatch, run_batch
from ..model.attention import KVPoolTensors
from ..model.transformer import Transformer
from .memory import memory_of


class LocalExecutor:
    world_size = 1
    healthy = True

    def __init__(self, net: Transformer) -> None:
        self.net = net

    def run(self, batch: ForwardBatch, kv: KVPoolTensors | None, consume: Consume | None = None,
            forward: Callable[[ForwardBatch], torch.Tensor] | None = None) -> torch.Tensor | None:
        return run_batch(self.net, kv, batch, consume, forward)

    def init_pool(self, num_pages: int, page_size: int) -> None:
        pass

    def check(self) -> None:
        """A single process can always run its model."""

    def memory_report(self, pool_bytes: int) -> list[dict[str, int]]:
        return [memory_of(0, self.net, pool_bytes)]

    def shutdown(self) -> None:
        pass
