"""End to end: the engine on the (interpreted) Triton kernels commits the same tokens as on the torch paths."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.bundled import task

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

PARAMS = [
    pytest.param(SamplingParams(steps=4), id="no-cache-greedy"),
    pytest.param(SamplingParams(cache="dual", threshold=0.9), id="dual-threshold"),
    pytest.param(SamplingParams(cache="prefix", temperature=0.8, seed=3, remasking="margin", block_length=8,
                                steps=4), id="prefix-sampled-margin"),
    pytest.param(SamplingParams(cache="dual", remasking="entropy", block_length=8, steps=4), id="dual-entropy"),
]


def pair(path, **kw) -> tuple[LLM, LLM]:
    kw.setdefault("dtype", "float32")  # token equality across backends is asserted in fp32 (bf16 rounds differently)
    return (LLM(path, device=DEVICE, kernels="torch", page_size=4, **kw),
            LLM(path, device=DEVICE, kernels="triton", page_size=4, **kw))


@pytest.fixture(scope="module")
def bundled() -> tuple[LLM, LLM]:
    return pair(None)


@pytest.mark.slow
@pytest.mark.parametrize("params", PARAMS)
def test_bundled_model_same_tokens(bundled, params):
    ref, tri = bundled
    assert tri.model.kernels == "triton" and ref.model.kernels == "torch"
    msgs = [task.messages_for(p) for p in ("sort 3 1 2", "reverse 5 9 1 7 4")]
    want, got = ref.chat(msgs, params), tri.chat(msgs, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.text for o in want] == ["1 2 3", "4 7 1 9 5"]  # the trained model solves them either way


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llada_moe", "rnd1"])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_moe_families_same_tokens(make_checkpoint, family, cache):
    """LLaDA-MoE (top-k weights not renormalised) and RND1 (renormalised, GQA, head_dim 12), rows of different
    lengths in one batch."""
    ref, tri = pair(make_checkpoint(family))
    prompts = [[5, 17, 23, 9, 41, 2, 7], [11, 3]]
    params = SamplingParams(max_tokens=8, steps=4, block_length=4, cache=cache, ignore_eos=True, seed=7)
    want, got = ref.generate(prompts, params), tri.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_full_forward_logits_match(make_checkpoint):
    """DiffusionModel.logits (packed rows, no cache: the varlen kernel and fused MoE) on both backends."""
    ref, tri = pair(make_checkpoint("rnd1"))
    ids = torch.randint(0, 150, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    want, got = ref.model.logits(ids, mask), tri.model.logits(ids, mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
