"""Per-rank memory report: parameter bytes, KV pool bytes and the process's resident set size."""
from __future__ import annotations

import torch


def memory_of(rank: int, net: torch.nn.Module, pool_bytes: int) -> dict[str, int]:
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    rss = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return dict(rank=rank, param_bytes=params, kv_pool_bytes=pool_bytes, rss_bytes=rss)
