"""Shared fixtures: tiny random checkpoints in each family's real format, written once per session."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run interpreted (must be set before triton is first imported).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FAMILIES = ("llada", "llada_moe", "dream", "rnd1")

# Tiny, odd dimensions. Dream and RND1 use GQA (kv heads < heads); RND1 has head_dim != hidden / heads.
FAMILY_DIMS: dict[str, dict[str, Any]] = {
    "llada": dict(hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=80, vocab_size=211),
    "llada_moe": dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, num_experts=8, top_k=2,
                      moe_intermediate_size=24, vocab_size=173),
    "dream": dict(hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=96, vocab_size=199),
    "rnd1": dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12, num_experts=6, top_k=3,
                 moe_intermediate_size=20, vocab_size=157),
    # block-diffusion (tests/test_llada2.py): GQA, head_dim != hidden / heads, partial rotary, grouped routing
    "llada2_moe": dict(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=12, num_experts=8, top_k=2,
                       n_group=4, topk_group=2, moe_intermediate_size=16, vocab_size=173),
    # block-diffusion Qwen3 (tests/test_sdar.py): GQA, head_dim != hidden / heads
    "sdar": dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12, intermediate_size=48,
                 vocab_size=173),
}

# Shared by the decoding tests: the same small shape for every family (MoE: 5 experts, top-2).
TINY_DIMS: dict[str, Any] = dict(hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=None, head_dim=None,
                                 intermediate_size=None, num_experts=5, top_k=2, moe_intermediate_size=None)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """make_checkpoint(family, **overrides) -> directory; cached per argument set for the whole session."""
    from engine.random_checkpoint import write_random_checkpoint

    cache: dict[tuple, Path] = {}

    def make(family: str, **overrides: Any) -> Path:
        kwargs = {**FAMILY_DIMS[family], "seed": 11, **overrides}
        key = (family, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{family}")
            cache[key] = write_random_checkpoint(out, family, **kwargs)
        return cache[key]

    return make
