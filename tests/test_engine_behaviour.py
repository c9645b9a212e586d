"""Engine behaviour a user relies on: parameter validation, pool refusal, logits only where decoded, seeded
sampling, stop strings, finish reasons."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, RequestTooLargeError, SamplingParams, SamplingParamsError


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    return LLM(make_checkpoint("llada"), dtype="float32", kv_cache_memory=1 << 22, page_size=8)


BAD = [("max_tokens", 0), ("max_tokens", 2.5), ("steps", -1), ("block_length", True), ("temperature", -0.1),
       ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("remasking", "greedy"), ("threshold", 0.0),
       ("threshold", 1.2), ("factor", 0), ("cfg_scale", -1), ("seed", "7"), ("stop", ""), ("stop", [1]),
       ("ignore_eos", "yes"), ("cache", "paged"), ("algorithm", "mdlm"), ("alg_temp", -1), ("eps", 1.0)]


@pytest.mark.parametrize("field,value", BAD)
def test_invalid_field_is_named(field, value):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field and f"SamplingParams.{field}" in str(e.value)


def test_threshold_and_factor_are_exclusive_and_origin_needs_dream():
    with pytest.raises(SamplingParamsError, match="factor"):
        SamplingParams(threshold=0.9, factor=1.0)
    with pytest.raises(SamplingParamsError, match="remasking"):
        SamplingParams(remasking="origin", algorithm="llada")
    assert SamplingParams(remasking="maskgit_plus").remasking == "low_confidence"


def test_bad_prompts_are_refused_clearly(llm):
    cfg = llm.model.config
    with pytest.raises(ValueError, match=r"prompts\[1\]: token id"):
        llm.generate([[1, 2], [cfg.vocab_size]], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="mask token"):
        llm.generate([[1, cfg.mask_id]], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="params"):
        llm.generate([[1], [2]], [SamplingParams(max_tokens=4)])
    assert llm.engine.allocator.num_used == 0 and not llm.engine.has_unfinished()


def test_request_larger_than_pool_is_refused_and_nothing_leaks(llm):
    pool_tokens = llm.engine.allocator.num_pages * llm.engine.allocator.page_size
    with pytest.raises(RequestTooLargeError, match="max_tokens"):  # a request fault, not MemoryError
        llm.generate([[1, 2, 3], [4]], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=pool_tokens)])
    assert llm.engine.allocator.num_used == 0 and not llm.engine.has_unfinished()
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, steps=4))[0]
    assert len(out.token_ids) <= 4


def test_more_requests_than_the_pool_holds_at_once_all_finish(make_checkpoint):
    llm = LLM(make_checkpoint("llada"), dtype="float32", kv_cache_memory=None, page_size=4, max_num_seqs=3)
    prompts = [[i + 1] * (3 + i % 4) for i in range(10)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, steps=8, block_length=4, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [8] * 10
    assert llm.engine.allocator.num_used == 0


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_logits_only_at_the_current_block(llm, cache, monkeypatch):
    """No [batch, canvas, vocab] tensor: the lm_head runs on the block's positions only."""
    rows = []
    real = llm.model.net.compute_logits
    monkeypatch.setattr(llm.model.net, "compute_logits", lambda h: rows.append(h.shape[0]) or real(h))
    prompts = [list(range(1, 40)), list(range(2, 20))]
    llm.generate(prompts, SamplingParams(max_tokens=24, block_length=6, steps=24, cache=cache, ignore_eos=True))
    assert rows and max(rows) <= 2 * 6


def test_seeded_sampling_is_reproducible_and_batch_invariant(llm):
    p = SamplingParams(max_tokens=12, steps=12, block_length=4, temperature=0.8, seed=1234, ignore_eos=True)
    alone = llm.generate([[3, 4, 5]], p)[0].token_ids
    batched = llm.generate([[9, 9], [3, 4, 5], [7]], [SamplingParams(max_tokens=5, temperature=1.0, seed=1), p,
                                                      SamplingParams(max_tokens=12, cache="dual")])[1].token_ids
    assert alone == batched
    other = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=12, steps=12, block_length=4, temperature=0.8,
                                                     seed=99, ignore_eos=True))[0].token_ids
    greedy = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=12, steps=12, block_length=4,
                                                      ignore_eos=True))[0].token_ids
    assert other != alone or greedy != alone


def test_sampling_follows_the_temperature_scaled_distribution(llm):
    """Gumbel-max with the counter noise samples from softmax(l / T): check frequencies on one position."""
    from engine.decoding.candidates import CandidateInputs, candidates
    torch.manual_seed(0)
    logits = torch.randn(1, 6) * 1.5
    n = 4000
    inp = CandidateInputs(torch.full((n,), 0.7), torch.zeros(n, dtype=torch.long), torch.ones(n),
                          torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool),
                          torch.arange(n) * 7919 + 13, mask_id=5, any_sampling=True, any_filter=False)
    x0, _, _ = candidates(logits.expand(n, 6).contiguous(), inp)
    freq = torch.bincount(x0, minlength=6).float() / n
    expected = torch.softmax(logits[0, :5] / 0.7, -1)  # the mask id (5) is never a candidate
    assert freq[5] == 0
    assert torch.allclose(freq[:5], expected, atol=0.03), (freq, expected)


def test_top_k_and_top_p_restrict_candidates(llm):
    from engine.decoding.candidates import CandidateInputs, candidates
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).expand(500, 6).contiguous()
    def run(top_k, top_p):
        inp = CandidateInputs(torch.full((500,), 5.0), torch.full((500,), top_k), torch.full((500,), top_p),
                              torch.zeros(500, dtype=torch.long), torch.zeros(500, dtype=torch.bool),
                              torch.arange(500), mask_id=5, any_sampling=True, any_filter=True)
        return set(candidates(logits, inp)[0].tolist())
    assert run(2, 1.0) == {0, 1}
    # at T=5 the tempered probabilities are ~[.22, .18, .15, .12, .10, .08]: the nucleus of 0.5 is the first three
    probs = torch.softmax(logits[0] / 5, -1)
    assert probs[:2].sum() < 0.5 < probs[:3].sum()
    assert run(0, 0.5) == {0, 1, 2}
    assert run(0, 1.0) == {0, 1, 2, 3, 4}


def test_threshold_commits_several_tokens_per_step(llm):
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=16, block_length=8, threshold=0.001,
                                                   ignore_eos=True))[0]
    assert out.steps < 16 and out.tokens_per_forward > 1
    bounded = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=16, block_length=8, steps=4, threshold=0.999,
                                                       ignore_eos=True))[0]
    assert bounded.steps <= 4 and len(bounded.token_ids) == 16  # steps bound the block: the last step fills it


def test_stop_strings_cut_text(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=16, steps=16, block_length=4, ignore_eos=True))[0]
    assert out.text
    stop = out.text.strip()[2:5]
    cut = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=16, steps=16, block_length=4, ignore_eos=True,
                                                   stop=[stop]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and out.text.startswith(cut.text)


def test_chat_applies_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=4, steps=4))[0]
    expected = llm.model.apply_chat_template([{"role": "user", "content": "hello"}])
    assert out.prompt_token_ids == expected
    assert "<|start_header_id|>assistant<|end_header_id|>" in llm.model.decode(expected, skip_special_tokens=False)
