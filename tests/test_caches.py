"""Prefix / dual caches and threshold / factor decoding equal the plain Fast-dLLM loops, token for token."""
from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams
from tests.conftest import TINY_DIMS
from tests.reference_fastdllm import fastdllm_generate
from tests.test_sampler_exact import random_prompt

FAMILIES = ["llada", "llada_moe", "dream", "rnd1"]


@pytest.fixture(scope="module")
def llms(make_checkpoint):
    return {fam: LLM(make_checkpoint(fam, **TINY_DIMS, vocab_size=97, seed=31 + i, tokenizer=False),
                     dtype="float32", page_size=4) for i, fam in enumerate(FAMILIES)}


CASES = [  # (gen, block, steps, threshold, factor)
    (8, 4, 8, None, None), (12, 4, 6, None, None), (9, 3, 9, None, None), (8, 8, 4, None, None),
    (8, 4, 8, 0.05, None), (12, 3, 12, 0.02, None), (10, 5, 10, 0.5, None), (8, 4, 8, None, 1.0),
    (12, 6, 12, None, 1.2),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_cache_modes_match_fastdllm_reference(llms, family, cache):
    llm, rng = llms[family], random.Random(FAMILIES.index(family) * 10 + len(cache))
    cases = CASES if family in ("llada", "dream") else CASES[::2]
    for gen, block, steps, tau, f in cases:
        prompts = [random_prompt(rng, llm, rng.randint(1, 7)) for _ in range(rng.randint(1, 3))]
        params = SamplingParams(max_tokens=gen, block_length=block, steps=steps, threshold=tau, factor=f,
                                cache=cache, temperature=0.0, ignore_eos=True, algorithm="llada")
        outs = llm.generate(prompts, params)
        for prompt, out in zip(prompts, outs):
            ref, ref_steps = fastdllm_generate(llm.model, prompt, gen, block, steps, cache, tau, f)
            assert out.token_ids == ref, (gen, block, steps, tau, f, prompt)
            assert out.steps == ref_steps


def test_caches_actually_differ_from_no_cache(llms):
    """Guard against a vacuous comparison: on a random model the approximate caches change some outputs."""
    llm, rng = llms["llada"], random.Random(99)
    diffs = {"prefix": 0, "dual": 0}
    for _ in range(6):
        prompt = random_prompt(rng, llm, 5)
        base = llm.generate([prompt], SamplingParams(max_tokens=12, block_length=4, steps=12, ignore_eos=True))[0]
        for cache in diffs:
            out = llm.generate([prompt], SamplingParams(max_tokens=12, block_length=4, steps=12, cache=cache,
                                                        ignore_eos=True))[0]
            diffs[cache] += out.token_ids != base.token_ids
    assert diffs["prefix"] > 0 and diffs["dual"] > 0


def test_cached_modes_compute_fewer_positions(llms):
    llm = llms["llada"]
    prompt = list(range(1, 30))
    stats = {c: llm.generate([prompt], SamplingParams(max_tokens=16, block_length=4, steps=16, cache=c,
                                                      ignore_eos=True))[0].stats for c in ("none", "prefix", "dual")}
    # none: 16 full passes over 45 positions; dual: a full pass per block + 3 block passes of 4 per block
    assert stats["none"].positions_computed == 16 * 45
    assert stats["dual"].positions_computed == 4 * 45 + 4 * 3 * 4
    assert stats["dual"].positions_computed < stats["prefix"].positions_computed < stats["none"].positions_computed
