"""Prompt-prefix reuse on a tiny random LLaDA2 checkpoint (block-causal): the same tokens with and without reuse
(mixed batches, prompts sharing system prompts, the default dtype, eviction under a small pool, the Triton kernels
interpreted), the vLLM-style counters in tokens, and --no-prefix-caching / bidirectional families never sharing.
The reference is the same engine with prefix caching off (itself checked against the plain-torch reference loop
in tests/test_llada2.py)."""
from __future__ import annotations

import random

import pytest

from engine.kv_pool import kv_bytes_per_token
from engine.llm import LLM
from engine.sampling_params import SamplingParams

SYSTEMS = [[(7 * i + 3 * s) % 150 + 5 for i in range(24)] for s in range(3)]  # three 24-token system prompts


def workload(n: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """System prompt + a short user suffix; mixed block lengths, thresholds, sampling, one cache="none"."""
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(n):
        prompts.append(SYSTEMS[i % len(SYSTEMS)] + [rng.randrange(5, 150) for _ in range(rng.randint(1, 11))])
        kw: dict = dict(max_tokens=rng.choice([5, 8, 12]), block_length=rng.choice([4, 8]), ignore_eos=True,
                        temperature=0.0, threshold=rng.choice([None, 0.5]))
        if i % 4 == 1:
            kw.update(temperature=0.8, top_k=20, seed=rng.randrange(1 << 20))
        if i % 5 == 3:
            kw.update(cache="none")
        params.append(SamplingParams(**kw))
    return prompts, params


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint("llada2_moe")


def ids(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


@pytest.mark.slow
def test_same_tokens_with_and_without_reuse(path):
    """Default dtype (bf16 on this CPU). First call: requests admitted in one step compute their prompts
    (later steps' admissions hit); second call: every eligible prompt hits."""
    prompts, params = workload(8, seed=1)
    off = LLM(path, page_size=4, enable_prefix_caching=False)
    assert off.engine.prefix_cache is None
    want = ids(off.generate(prompts, params))
    on = LLM(path, page_size=4, max_num_seqs=3)  # admissions spread over steps: some hit within the first call
    assert ids(on.generate(prompts, params)) == want
    pc = on.engine.prefix_cache
    first_hits = pc.hits
    assert ids(on.generate(prompts, params)) == want
    assert pc.hits > first_hits > 0
    eligible = sum(len(p) for p, sp in zip(prompts, params) if sp.cache != "none")
    assert pc.queries == 2 * eligible  # tokens looked up; cache="none" requests are never looked up
    # one at a time, in reverse order: still the same
    assert [on.generate([p], [sp])[0].token_ids for p, sp in zip(prompts[::-1], params[::-1])] == want[::-1]


def test_eviction_under_a_small_pool(path):
    prompts, params = workload(9, seed=2)
    for sp in params:
        sp.cache, sp.block_length = "block", 8
    want = ids(LLM(path, page_size=4, enable_prefix_caching=False).generate(prompts, params))
    probe = LLM(path, page_size=4)
    per_page = kv_bytes_per_token(probe.model.config, probe.model.dtype) * 4
    small = LLM(path, page_size=4, kv_cache_memory=per_page * 24, max_num_seqs=2)  # ~2 canvases at once
    pc = small.engine.prefix_cache
    assert pc.num_pages == 24
    got = ids(small.generate(prompts, params))
    assert got == want and pc.evictions > 0 and pc.hits > 0
    assert pc.num_used == 0 and pc.num_free == 24


@pytest.mark.slow
def test_triton_kernels_interpreted_same_tokens(path):
    """The Triton block-causal attention and grouped router (interpreted on CPU) with prefix reuse."""
    prompts, params = workload(3, seed=3)
    torch_out = ids(LLM(path, page_size=4, dtype="float32", kernels="torch").generate(prompts, params))
    tri = LLM(path, page_size=4, dtype="float32", kernels="triton")
    assert ids(tri.generate(prompts, params)) == torch_out
    assert ids(tri.generate(prompts[:1], params[:1])) == torch_out[:1] and tri.engine.prefix_cache.hits > 0


def test_bidirectional_families_never_share(make_checkpoint):
    llm = LLM(make_checkpoint("llada"), page_size=4)
    assert llm.engine.prefix_cache is None
    llm.generate([SYSTEMS[0] + [1], SYSTEMS[0] + [2]], SamplingParams(max_tokens=4, block_length=4, cache="prefix"))
