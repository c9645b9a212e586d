"""LLaDA2 over 2 processes (gloo, CPU): tensor parallel (heads incl. the fused q/k/v, experts' and shared experts'
widths sharded, the group-limited router replicated) and expert parallel compute what one process does: block-causal
logits within fp32 noise, the same tokens (prefix reuse on)."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ep", [False, True], ids=["tp", "ep"])
def test_llada2_sharded_matches_one_process(make_checkpoint, ep):
    path = make_checkpoint("llada2_moe", num_shared_experts=2)
    opts = dict(kv_cache_memory=1 << 22, page_size=4, dtype="float32")
    one = LLM(path, **opts)
    ids = torch.randint(0, 150, (2, 11), generator=torch.Generator().manual_seed(1))
    system = list(range(20, 36))
    prompts = [system + [5, 6, 7], system + [9], [40, 41, 42]]
    params = [SamplingParams(max_tokens=9, block_length=4, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=6, block_length=8, threshold=0.5, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=5, block_length=4, temperature=0.9, seed=3, ignore_eos=True)]
    want = [o.token_ids for o in one.generate(prompts, params)]
    with LLM(path, tensor_parallel_size=2, expert_parallel=ep, parallel_timeout=60, **opts) as tp:
        for block in (None, 4):
            a, b = tp.model.logits(ids, block_length=block), one.model.logits(ids, block_length=block)
            assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5
        assert [o.token_ids for o in tp.generate(prompts, params)] == want
        assert [o.token_ids for o in tp.generate(prompts, params)] == want  # second time: prompt pages reused
        assert tp.engine.prefix_cache.hits > 0
