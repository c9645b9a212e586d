"""ParallelConfig (how many ranks share the model, and how), torchrun detection and each rank's device."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Ranks (processes, one device each) that share the model."""
    expert_parallel: bool = False
    """MoE layers: partition whole experts over the ranks instead of splitting each expert's intermediate size."""
    timeout_s: float = 120.0
    """Collective timeout: a rank that stops answering for this long fails the step (and the engine)."""
    backend: str | None = None
    """torch.distributed backend of the model collectives; None: nccl on CUDA, gloo on CPU."""

    def __post_init__(self) -> None:
        n = self.tensor_parallel_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {n!r}")
        if not isinstance(self.expert_parallel, bool):
            raise ValueError(f"expert_parallel must be a bool, got {self.expert_parallel!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"parallel timeout must be > 0 seconds, got {self.timeout_s!r}")
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"parallel backend must be 'gloo' or 'nccl', got {self.backend!r}")


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by torchrun with more than one process, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "RANK" not in os.environ:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: cuda:(base + r) for a CUDA base device, the CPU otherwise."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


