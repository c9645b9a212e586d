"""LLaDA2 (`llada2_moe`): tiny random checkpoints in the real on-disk format, loaded by the engine and checked
against the independent plain-torch reference (tests/reference_llada2.py): the forward (full and block-causal),
generate at temperature 0 token for token, the exact block cache, batches, sampling invariance, request checks."""
from __future__ import annotations

import json

import pytest
import torch

from engine.errors import CheckpointError
from engine.llm import LLM
from engine.loader import load_model
from engine.sampling_params import SamplingParams, SamplingParamsError
from tests.reference_llada2 import RefLLaDA2

# GQA (4 q heads over 2 kv heads), head_dim 12 != 32 / 4, rotary on half of it, 8 experts in 4 groups (2 kept).
BASE = dict(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=12, vocab_size=173, num_experts=8,
            top_k=2, n_group=4, topk_group=2, moe_intermediate_size=16, first_k_dense_replace=1, seed=3)
VARIANTS = {
    "base": {},
    "no-dense-no-shared": dict(first_k_dense_replace=0, num_shared_experts=0, n_group=2, topk_group=1, top_k=3,
                               partial_rotary_factor=1.0),
    "two-dense-mha": dict(first_k_dense_replace=2, num_kv_heads=4, head_dim=8, num_shared_experts=2, top_k=1,
                          partial_rotary_factor=0.25),
}


@pytest.fixture(scope="module")
def ckpts(make_checkpoint):
    return {name: make_checkpoint("llada2_moe", **{**BASE, **kw}) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="module")
def llms(ckpts):
    return {name: LLM(path, dtype="float32") for name, path in ckpts.items()}


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 160, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _denoised_blocks(p: int, g: int, b: int) -> int:
    return -(-(p + g) // b) - p // b


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_reference(ckpts, variant):
    model = load_model(ckpts[variant])
    ref = RefLLaDA2(ckpts[variant])
    ids = torch.tensor([_prompt(13, 1)])
    for block in (None, 4, 5):
        got = model.logits(ids, block_length=block)[0]
        want = ref.logits(ids[0].tolist(), block)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (variant, block)
    # block-causal really differs from full attention, and a position never sees later blocks
    assert not torch.allclose(model.logits(ids)[0], model.logits(ids, block_length=4)[0], atol=1e-3)
    ids2 = ids.clone()
    ids2[0, 8:] = 7
    x, y = model.logits(ids, block_length=4)[0], model.logits(ids2, block_length=4)[0]
    assert torch.allclose(x[:8], y[:8], atol=1e-5) and not torch.allclose(x[8:], y[8:], atol=1e-2)


def test_config_and_special_ids(ckpts, tmp_path):
    cfg = load_model(ckpts["base"]).config
    assert (cfg.family, cfg.block_causal, cfg.rotary_dim, cfg.moe_layers) == ("llada2_moe", True, 6,
                                                                             (False, True, True))
    assert cfg.shared_expert_size == 16 and cfg.n_group == 4 and cfg.topk_group == 2
    from engine.random_checkpoint import write_random_checkpoint
    real = write_random_checkpoint(tmp_path / "real", "llada2_moe", **{**BASE, "vocab_size": 157184},
                                   special_ids="real", tokenizer=False)
    raw = json.loads((real / "config.json").read_text())
    assert "mask_token_id" not in raw and "eos_token_id" not in raw  # as the real config.json
    from engine.loader import read_config
    c = read_config(real)
    assert (c.mask_id, c.eos_id) == (156895, 156892)
    raw["n_group"] = 3
    (real / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="n_group"):
        read_config(real)


# (prompt length, max_tokens, block length, steps per block, threshold): prompts that are and are not multiples
# of the block length, generation lengths that are not, steps below and above the block length, quota-0 steps.
CASES = [(5, 11, 4, 3, 0.95), (8, 8, 4, 4, 0.5), (9, 13, 8, 5, 0.3), (3, 7, 16, 16, 0.9), (12, 20, 4, 2, 1.0),
         (16, 5, 8, 12, 0.2), (1, 3, 4, 4, 0.6)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_matches_reference(llms, ckpts, variant):
    llm, ref = llms[variant], RefLLaDA2(ckpts[variant])
    cases = CASES if variant == "base" else CASES[1:4]
    prompts = [_prompt(p, 10 + k) for k, (p, *_) in enumerate(cases)]
    want = [ref.generate(x, g, b, spb, t, stop_ids=()) for x, (_, g, b, spb, t) in zip(prompts, cases)]
    for cache in ("none", None):  # every request of the batch alone, then all of them in one batch
        params = [SamplingParams(max_tokens=g, block_length=b, steps=spb * _denoised_blocks(p, g, b), threshold=t,
                                 temperature=0.0, ignore_eos=True, cache=cache) for p, g, b, spb, t in cases]
        if cache is None:
            assert [o.token_ids for o in llm.generate(prompts, params)] == want, variant
        else:
            for x, sp, w, case in zip(prompts, params, want, cases):
                assert llm.generate([x], sp)[0].token_ids == w, (variant, case)


def test_threshold_commits_beyond_quota_and_stops_early(llms, ckpts):
    """The strict-threshold branch fires (fewer forwards than steps) and the count of forwards is the reference's."""
    llm, ref = llms["base"], RefLLaDA2(ckpts["base"])
    prompt, g, b, spb = _prompt(6, 3), 18, 8, 8
    calls = []
    real = ref.logits
    ref.logits = lambda ids, bl: calls.append(len(ids)) or real(ids, bl)
    want = ref.generate(prompt, g, b, spb, 0.2, stop_ids=())
    out = llm.generate([prompt], SamplingParams(max_tokens=g, block_length=b, steps=spb * _denoised_blocks(6, g, b),
                                                threshold=0.2, temperature=0.0, ignore_eos=True))[0]
    assert out.token_ids == want
    assert out.stats.steps == len(calls) < spb * _denoised_blocks(6, g, b)


def test_eos_cut_matches_reference(llms, ckpts, make_checkpoint):
    """The same weights with a frequent token as EOS: the engine stops where the reference does and returns the
    same tokens (cut after the first EOS)."""
    prompt, g, b = _prompt(7, 4), 24, 4
    sp = dict(max_tokens=g, block_length=b, steps=4 * 8, threshold=0.5, temperature=0.0)
    full = llms["base"].generate([prompt], SamplingParams(**sp, ignore_eos=True))[0].token_ids
    stop = full[len(full) // 2]
    path = make_checkpoint("llada2_moe", **BASE, tokenizer=False, special_ids={"eos": stop})
    llm, ref = LLM(path, dtype="float32"), RefLLaDA2(path)
    assert ref.eos_id == stop and llm.model.config.stop_ids == (stop,)
    out = llm.generate([prompt], SamplingParams(**sp))[0]
    want = ref.generate(prompt, g, b, 4, 0.5)
    assert want == full[:full.index(stop) + 1]  # the reference returns the EOS; the engine cuts it (as always)
    assert out.token_ids == want[:-1] and out.finish_reason == "stop"


def test_batch_equals_alone_and_cache_exact_bf16(ckpts):
    """Mixed requests (lengths, block lengths, thresholds, cache on/off, sampling) in one batch give what each gives
    alone, at the default dtype; the block cache gives the same tokens as none."""
    batch_equals_alone_and_cache_exact(LLM(ckpts["base"]))  # dtype auto


@pytest.mark.parametrize("family", ["llada2_moe", "sdar"])
def test_block_causal_batch_invariance_in_bfloat16(family, ckpts, make_checkpoint):
    """bfloat16 whatever the CPU's default (oneDNN's native bf16 GEMM / SDPA on AVX512-BF16, torch's elsewhere):
    block-causal attention runs one SDPA per (query, key) length group with each group's own block mask, so a
    row's rounding does not move with the batch's longest row (one padded layout for the batch made the first
    request's tokens differ batched and alone on an AVX512-BF16 CPU)."""
    if family == "sdar":
        from tests.test_sdar import BASE as SDAR_BASE
        ckpt = make_checkpoint("sdar", **{**SDAR_BASE, "seed": 4, "hidden_size": 64, "head_dim": 16})
    else:
        ckpt = ckpts["base"]
    batch_equals_alone_and_cache_exact(LLM(ckpt, dtype="bfloat16"))


def batch_equals_alone_and_cache_exact(llm: LLM) -> None:
    reqs = [(_prompt(3, 1), SamplingParams(max_tokens=9, block_length=4, threshold=0.4, temperature=0.0)),
            (_prompt(8, 2), SamplingParams(max_tokens=13, block_length=8, steps=6, temperature=0.0, cache="none")),
            (_prompt(17, 3), SamplingParams(max_tokens=5, block_length=4, temperature=0.7, top_k=30, seed=9)),
            (_prompt(11, 4), SamplingParams(max_tokens=12, block_length=16, temperature=1.0, top_p=0.8, seed=2,
                                            threshold=0.3))]
    for sp in (r[1] for r in reqs):
        sp.ignore_eos = True
    batch = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs])
    alone = [llm.generate([p], [sp])[0] for p, sp in reqs]
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]
    for p, sp in reqs:
        other = SamplingParams(**{**sp.__dict__, "cache": "none" if sp.cache != "none" else "block"})
        assert llm.generate([p], [other])[0].token_ids == llm.generate([p], [sp])[0].token_ids


def test_requests_checked(llms):
    llm = llms["base"]
    for field, kw in [("algorithm", dict(algorithm="llada")), ("factor", dict(factor=1.0)),
                      ("cfg_scale", dict(cfg_scale=1.0)), ("remasking", dict(remasking="entropy"))]:
        with pytest.raises(SamplingParamsError) as e:
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, **kw))
        assert e.value.field == field
    # prefix / dual are exact for this family: mapped to the block cache
    a = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=6, block_length=4, cache="dual", temperature=0.0))
    b = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=6, block_length=4, cache="none", temperature=0.0))
    assert a[0].token_ids == b[0].token_ids


def test_block_cache_refused_for_bidirectional(make_checkpoint):
    llm = LLM(make_checkpoint("llada"), dtype="float32")
    with pytest.raises(SamplingParamsError) as e:
        llm.generate([[1, 2]], SamplingParams(max_tokens=4, cache="block"))
    assert e.value.field == "cache"
    with pytest.raises(SamplingParamsError) as e:
        llm.generate([[1, 2]], SamplingParams(max_tokens=4, algorithm="llada2"))
    assert e.value.field == "algorithm"


def test_family_defaults(llms):
    d = llms["base"].defaults
    assert (d.block_length, d.steps_per_block, d.threshold, d.cache, d.algorithm) == (32, 32, 0.95, "block", "llada2")
    r = SamplingParams(max_tokens=40).resolve(d)
    assert (r.block_length, r.threshold, r.cache, r.steps_per_block) == (32, 0.95, "block", 32)


EDIT_CASES = [(5, 11, 4, 3, 0.5, 0.3, 4), (8, 8, 4, 4, 0.5, 0.2, 16), (9, 13, 8, 5, 0.3, 0.1, 2),
              (12, 20, 4, 2, 1.0, 0.05, 0)]


def test_editing_matches_reference(llms, ckpts):
    """LLaDA2.1 token editing ("llada2.1-edit") against the reference loop; it does change the output."""
    llm, ref = llms["base"], RefLLaDA2(ckpts["base"])
    changed = 0
    for k, (p, g, b, spb, t, e, post) in enumerate(EDIT_CASES):
        prompt = _prompt(p, 30 + k)
        sp = SamplingParams(max_tokens=g, block_length=b, steps=spb * _denoised_blocks(p, g, b), threshold=t,
                            temperature=0.0, ignore_eos=True, editing_threshold=e, max_post_steps=post)
        want = ref.generate(prompt, g, b, spb, t, stop_ids=(), editing_threshold=e, max_post_steps=post)
        assert llm.generate([prompt], sp)[0].token_ids == want, (p, g, b, spb, t, e, post)
        changed += want != ref.generate(prompt, g, b, spb, t, stop_ids=())
    assert changed >= 2


def test_editing_batched_with_plain_requests(llms):
    llm = llms["base"]
    reqs = [(_prompt(5, 1), SamplingParams(max_tokens=11, block_length=4, threshold=0.5, editing_threshold=0.2,
                                           temperature=0.0, ignore_eos=True)),
            (_prompt(9, 2), SamplingParams(max_tokens=7, block_length=8, threshold=0.4, temperature=0.0,
                                           ignore_eos=True)),
            (_prompt(3, 3), SamplingParams(max_tokens=9, block_length=4, editing_threshold=0.3, max_post_steps=1,
                                           temperature=0.9, seed=4, ignore_eos=True))]
    batch = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs])
    assert [o.token_ids for o in batch] == [llm.generate([p], [sp])[0].token_ids for p, sp in reqs]


def test_editing_needs_block_diffusion(make_checkpoint):
    llm = LLM(make_checkpoint("llada"), dtype="float32")
    for field in ("editing_threshold", "max_post_steps"):
        with pytest.raises(SamplingParamsError) as e:
            llm.generate([[1, 2]], SamplingParams(max_tokens=4, **{field: 1}))
        assert e.value.field == field
