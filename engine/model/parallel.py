"""How this process's share of the model is cut (Megatron-style tensor parallelism) and the collectives it needs.

A layer built with a `Shard` holds only its rank's slice of each weight:
- column-parallel (q/k/v, gate/up, expert gate/up): output features split; no communication.
- row-parallel (o_proj, down, expert down): input features split; partial outputs summed by one all-reduce.
- vocabulary-parallel (embedding, lm_head): rows split into equal padded chunks; the embedding's partial lookups are
  summed by an all-reduce, the lm_head's logit columns gathered to rank 0.
- expert-parallel MoE: whole experts split across ranks; every rank routes all tokens (router replicated), computes
  its own experts' contributions, one all-reduce combines them.
With size 1 every helper is the identity, so a single process runs exactly the unsharded code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Balanced contiguous split of n items: rank r gets [start, end) (the first n % size ranks get one more)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass(slots=True)
class Shard:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False
    """MoE: partition whole experts across ranks instead of splitting every expert's intermediate size."""
    group: Any = None
    """torch.distributed process group of the ranks sharing the model (None: the default group)."""

    @property
    def active(self) -> bool:
        return self.size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum partial results over ranks (in place; identity for one rank)."""
        if self.size > 1:
            import torch.distributed as dist
            dist.all_reduce(x, group=self.group)
        return x

    # head layout -------------------------------------------------------------------------------------------
    def heads(self, num_heads: int) -> tuple[int, int]:
        """[start, end) of this rank's query heads."""
        return num_heads // self.size * self.rank, num_heads // self.size * (self.rank + 1)

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """[start, end) of this rank's KV heads. With fewer KV heads than ranks each KV head is replicated on the
        size / num_kv_heads ranks whose query heads use it."""
        if num_kv_heads >= self.size:
            per = num_kv_heads // self.size
            return per * self.rank, per * (self.rank + 1)
        h = self.rank * num_kv_heads // self.size
        return h, h + 1

    def vocab(self, vocab_size: int) -> tuple[int, int]:
        """[start, end) of this rank's vocabulary rows; chunks are ceil(V / size) long (the last may be short)."""
        per = -(-vocab_size // self.size)
        return min(per * self.rank, vocab_size), min(per * (self.rank + 1), vocab_size)

    def vocab_chunk(self, vocab_size: int) -> int:
        return -(-vocab_size // self.size)

    def experts(self, num_experts: int) -> tuple[int, int]:
        return shard_range(num_experts, self.rank, self.size) if self.expert_parallel else (0, num_experts)

    def moe_inter(self, inter: int) -> tuple[int, int]:
        return (0, inter) if self.expert_parallel else shard_range(inter, self.rank, self.size)

    def check(self, num_heads: int, num_kv_heads: int, num_experts: int, where: str) -> None:
        """Raise ValueError when the heads (or experts) cannot be split over `size` ranks."""
        n = self.size
        if num_heads % n:
            raise ValueError(f"{where}: tensor_parallel_size {n} must divide the number of attention heads "
                             f"({num_heads})")
        if num_kv_heads % n and n % num_kv_heads:
            raise ValueError(f"{where}: tensor_parallel_size {n} must divide, or be a multiple of, the number of "
                             f"KV heads ({num_kv_heads})")
        if self.expert_parallel and num_experts == 0:
            raise ValueError(f"{where}: expert_parallel needs a mixture-of-experts model; this one has no experts")
        if self.expert_parallel and num_experts < n:
            raise ValueError(f"{where}: expert parallel over {n} ranks needs at least {n} experts, the model has "
                             f"{num_experts}")


SINGLE = Shard()
