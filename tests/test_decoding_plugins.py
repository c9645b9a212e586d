"""Decoding strategies are plug-ins: a rule registered at run time (one object, as a new file under
engine/decoding/remasking/ or transfer/ would register) is accepted by SamplingParams, listed by the registry, and
decodes through LLM exactly as a plain reference loop with that rule, alone and mixed with built-in rules in one
batch (one pass, the combiner keeps each row's rule)."""
from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams, SamplingParamsError
from engine.decoding import registry
from engine.decoding.registry import Remasking, Transfer
from engine.decoding.select import top_count
from tests.conftest import TINY_DIMS
from tests.reference_sampler import llada_generate, no_mask


def least_confident(stats):
    """Toy rule: commit the least likely candidates first."""
    return -stats.p_x0, 1 - stats.p_x0


def halve(seq) -> float:
    """Toy transfer rule: commit half of the still-masked positions (at least one), all on the last step."""
    if seq.step_in_block >= seq.block_steps - 1:
        return seq.masked_in_block
    return max(1, seq.masked_in_block // 2)


@pytest.fixture
def toy_rules():
    registry.register_remasking(Remasking("least_confident", least_confident, "toy: lowest p(x0) first"))
    registry.register_transfer(Transfer("halve", halve, top_count, "toy: half of the masks left per step"))
    try:
        yield
    finally:
        registry.unregister("least_confident", "remasking")
        registry.unregister("halve", "transfer")


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    return LLM(make_checkpoint("llada", **TINY_DIMS, vocab_size=131, seed=3, tokenizer=False), dtype="float32")


def prompts(llm: LLM, n: int, seed: int) -> list[list[int]]:
    rng, cfg = random.Random(seed), llm.model.config
    ok = [t for t in range(cfg.vocab_size) if t not in (cfg.mask_id, *cfg.stop_ids)]
    return [[rng.choice(ok) for _ in range(rng.randint(1, 7))] for _ in range(n)]


def test_a_registered_remasking_rule_decodes_like_its_reference(llm, toy_rules):
    assert "least_confident" in registry.remasking_names()
    with pytest.raises(SamplingParamsError, match="least_confident"):  # listed in the error's choices
        SamplingParams(remasking="no_such_rule")
    ps = prompts(llm, 3, seed=1)
    toy = SamplingParams(max_tokens=12, block_length=4, steps=6, remasking="least_confident", ignore_eos=True)
    builtin = SamplingParams(max_tokens=12, block_length=4, steps=6, remasking="margin", ignore_eos=True)
    # one batch mixing the toy rule with a built-in one
    outs = llm.generate(ps, [toy, builtin, toy])
    ref_toy = [llada_generate(llm.model, p, 12, 4, 6, remasking=lambda p, x0: -p.gather(-1, x0[..., None])[..., 0])
               for p in ps]
    assert outs[0].token_ids == ref_toy[0] and outs[2].token_ids == ref_toy[2]
    assert outs[1].token_ids == llada_generate(llm.model, ps[1], 12, 4, 6, remasking="margin")
    # not vacuous: the toy order differs from low_confidence's on these prompts
    assert any(r != llada_generate(llm.model, p, 12, 4, 6) for p, r in zip(ps, ref_toy))


def test_a_registered_transfer_rule_decodes_like_its_reference(llm, toy_rules, monkeypatch):
    """A toy schedule, chosen as an algorithm: the same tokens as the reference loop given its per-step counts
    (the reference's counts are fixed per block, so one step per position: halving commits one when <= 3 left)."""
    assert "halve" in registry.algorithm_names()
    ps = prompts(llm, 2, seed=2)
    params = SamplingParams(max_tokens=4, block_length=2, steps=2, algorithm="halve", ignore_eos=True)
    plain = SamplingParams(max_tokens=4, block_length=2, steps=2, algorithm="llada", ignore_eos=True)
    outs = llm.generate(ps, [params, plain])
    # blocks of 2 masks over 2 steps: halve commits 1 then 1, the same counts as llada's even split
    for p, out in zip(ps, outs):
        assert out.token_ids == llada_generate(llm.model, p, 4, 2, 2)
    long = SamplingParams(max_tokens=8, block_length=8, steps=3, algorithm="halve", ignore_eos=True)
    out = llm.generate([ps[0]], long)[0]
    assert out.steps == 3 and out.tokens_per_forward == pytest.approx(8 / 3)
    ref = _llada_with_counts(llm, ps[0], 8, [4, 2, 2])
    assert out.token_ids == ref


def _llada_with_counts(llm: LLM, prompt: list[int], gen: int, counts: list[int]) -> list[int]:
    """One block, greedy low_confidence, committing counts[i] positions at step i (the reference's top-k loop)."""
    model, mask_id = llm.model, llm.model.config.mask_id
    x = torch.tensor([prompt + [mask_id] * gen])
    for k in counts:
        logits = model.logits(x)  # [1, L, V]
        x0 = no_mask(logits, mask_id).argmax(-1)
        p = torch.softmax(logits, dim=-1)
        conf = p.gather(-1, x0[..., None])[..., 0].double()
        conf = torch.where(x == mask_id, conf, torch.tensor(-float("inf"), dtype=conf.dtype))
        idx = torch.topk(conf[0], k).indices
        x[0, idx] = x0[0, idx]
    return x[0, len(prompt):].tolist()


def test_unregistered_rules_are_refused_again(llm):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(remasking="least_confident")
    assert e.value.field == "remasking"
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(algorithm="halve")
    assert e.value.field == "algorithm"
