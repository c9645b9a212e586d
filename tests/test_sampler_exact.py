"""The engine's cache="none" decoding equals the plain reference loops token for token (temperature 0)."""
from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams
from tests.conftest import TINY_DIMS
from tests.reference_sampler import dream_generate, llada_generate, rnd1_generate

FAMILIES = ["llada", "llada_moe", "dream", "rnd1"]


@pytest.fixture(scope="module")
def llms(make_checkpoint):
    return {fam: LLM(make_checkpoint(fam, **TINY_DIMS, vocab_size=131, seed=11 + i, tokenizer=False), dtype="float32")
            for i, fam in enumerate(FAMILIES)}


def random_prompt(rng: random.Random, llm: LLM, length: int) -> list[int]:
    cfg = llm.model.config
    banned = {cfg.mask_id, *cfg.stop_ids}
    return [t for t in (rng.randrange(cfg.vocab_size) for _ in range(length * 2)) if t not in banned][:length]


def random_llada_case(rng: random.Random) -> dict:
    block = rng.choice([2, 3, 4, 8])
    nb = rng.randint(1, 3)
    steps_per_block = rng.choice([1, 2, block, block + 1])
    return dict(gen_length=block * nb, block_length=block, steps=steps_per_block * nb,
                cfg_scale=rng.choice([0.0, 0.0, 1.5]), remasking=rng.choice(["low_confidence", "low_confidence",
                                                                           "margin", "entropy"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_llada_algorithm_matches_reference(llms, family):
    """LLaDA's generate (even per-block schedule, top-k on confidence, -inf beyond the block, CFG twin) over
    random cases; shifted families decode position p from the output at p - 1."""
    llm, rng = llms[family], random.Random(FAMILIES.index(family) * 7 + 1)
    for case_no in range(8):
        case = random_llada_case(rng)
        prompts = [random_prompt(rng, llm, rng.choice([1, 3, 6, 9])) for _ in range(rng.randint(1, 4))]
        params = SamplingParams(max_tokens=case["gen_length"], block_length=case["block_length"],
                                steps=case["steps"], cfg_scale=case["cfg_scale"], remasking=case["remasking"],
                                temperature=0.0, ignore_eos=True, algorithm="llada")
        outs = llm.generate(prompts, params)
        for prompt, out in zip(prompts, outs):
            ref = llada_generate(llm.model, prompt, **case)
            assert out.token_ids == ref, f"case {case_no} {case} prompt {prompt}"


def test_mixed_params_in_one_batch_match_reference(llms):
    llm, rng = llms["llada"], random.Random(5)
    cases = [random_llada_case(rng) for _ in range(6)]
    prompts = [random_prompt(rng, llm, rng.randint(1, 9)) for _ in cases]
    params = [SamplingParams(max_tokens=c["gen_length"], block_length=c["block_length"], steps=c["steps"],
                             cfg_scale=c["cfg_scale"], remasking=c["remasking"], ignore_eos=True) for c in cases]
    outs = llm.generate(prompts, params)
    for prompt, case, out in zip(prompts, cases, outs):
        assert out.token_ids == llada_generate(llm.model, prompt, **case)


def test_eos_cut_matches_reference(llms, tmp_path):
    """Without ignore_eos the output is the reference canvas cut at the first stop token, and the request stops
    early. To make EOS appear in a random model, config.json's eos_token_id is set to a token it often predicts."""
    import collections
    import json
    import shutil

    base, rng = llms["llada"], random.Random(3)
    prompts = [random_prompt(rng, base, 5) for _ in range(6)]
    refs = [llada_generate(base.model, p, gen_length=12, block_length=4, steps=12) for p in prompts]
    common = collections.Counter(t for r in refs for t in r[2:]).most_common(1)[0][0]
    d = tmp_path / "ckpt"
    shutil.copytree(base.model.path, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = cfg["pad_token_id"] = common
    (d / "config.json").write_text(json.dumps(cfg))
    llm = LLM(d, dtype="float32")
    assert llm.model.config.eos_id == common
    stopped = 0
    for prompt, ref in zip(prompts, refs):
        out = llm.generate([prompt], SamplingParams(max_tokens=12, block_length=4, steps=12))[0]
        cut = ref.index(common) if common in ref else len(ref)
        assert out.token_ids == ref[:cut]
        assert out.finish_reason == ("stop" if common in ref else "length")
        if common in ref[:8]:  # EOS within the first two blocks: the third block is never computed
            assert out.steps < 12
            stopped += 1
    assert stopped > 0, "no early stop happened; the test would be vacuous"


def test_graceful_rules_match_generalised_reference(llms):
    """max_tokens not a multiple of block_length -> a shorter last block; steps not a multiple of the block count
    -> the first (steps mod blocks) blocks get one extra step; fewer steps than blocks -> one per block."""
    llm, rng = llms["llada"], random.Random(8)
    for gen, block, steps, plan in [(10, 4, 5, [2, 2, 1]), (7, 3, 7, [3, 2, 2]), (9, 4, 2, [1, 1, 1]),
                                    (5, 8, 3, [3])]:
        prompt = random_prompt(rng, llm, 4)
        out = llm.generate([prompt], SamplingParams(max_tokens=gen, block_length=block, steps=steps,
                                                    ignore_eos=True))[0]
        assert out.token_ids == llada_generate(llm.model, prompt, gen, min(block, gen), sum(plan), block_steps=plan)
        assert out.steps == sum(plan)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_algorithms_match_reference(llms, alg):
    llm, rng = llms["dream"], random.Random(21)
    for _ in range(4):
        gen, steps = rng.choice([(8, 8), (12, 5), (9, 3)])
        prompt = random_prompt(rng, llm, rng.randint(1, 7))
        out = llm.generate([prompt], SamplingParams(max_tokens=gen, steps=steps, remasking=alg, temperature=0.0,
                                                    ignore_eos=True))[0]
        assert out.token_ids == dream_generate(llm.model, prompt, gen, steps, alg)


def test_rnd1_entropy_schedule_matches_reference(llms):
    llm, rng = llms["rnd1"], random.Random(4)
    for gen, steps in [(8, 8), (12, 5), (10, 3)]:
        prompt = random_prompt(rng, llm, rng.randint(1, 7))
        out = llm.generate([prompt], SamplingParams(max_tokens=gen, steps=steps, temperature=0.0, ignore_eos=True))[0]
        assert out.token_ids == rnd1_generate(llm.model, prompt, gen, steps)
        assert out.steps == steps


def test_family_defaults(llms):
    assert llms["dream"].defaults.remasking == "origin" and llms["dream"].defaults.algorithm == "dream"
    assert llms["rnd1"].defaults.algorithm == "rnd1" and llms["rnd1"].defaults.temperature == 0.1
    assert llms["llada"].defaults.steps == 128 and llms["llada"].defaults.block_length == 128
