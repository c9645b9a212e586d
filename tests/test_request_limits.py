"""Request isolation and limits: every SamplingParams value is bounded to what the engine can honour, a request's
bad value fails that request alone (never the batch it would join), over-long requests are refused cheaply and
first with a request-fault error, and the per-step logits working set stays within its budget."""
from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest

from engine import (LLM, AsyncEngine, RequestError, RequestTooLargeError, SamplingParams, SamplingParamsError)
from engine.sampling_params import MAX_STEPS, MAX_STOP_LENGTH, MAX_STOP_STRINGS


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    return LLM(make_checkpoint("llada"), kv_cache_memory=1 << 22, page_size=8)


OUT_OF_RANGE = [("seed", 2 ** 64), ("seed", -(2 ** 63) - 1), ("top_k", 2 ** 63), ("temperature", 1e308),
                ("temperature", math.inf), ("cfg_scale", 1e300), ("cfg_scale", math.nan), ("alg_temp", 1e300),
                ("steps", MAX_STEPS + 1), ("steps", 10 ** 12), ("max_tokens", 10 ** 12), ("block_length", 2 ** 70),
                ("stop", ["x"] * (MAX_STOP_STRINGS + 1)), ("stop", ["y" * (MAX_STOP_LENGTH + 1)]),
                ("cfg_scale", None), ("eps", None)]


@pytest.mark.parametrize("field,value", OUT_OF_RANGE)
def test_out_of_range_values_are_refused_on_construction(field, value):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field == e.value.param and isinstance(e.value, ValueError)


@pytest.mark.parametrize("seed", [2 ** 63, 2 ** 64 - 1, -(2 ** 63), 2 ** 62 + 5])
def test_64_bit_seeds_run_and_a_seed_is_its_value_modulo_2_64(llm, seed):
    p = dict(max_tokens=8, steps=8, block_length=4, temperature=0.9, ignore_eos=True)
    other = SamplingParams(max_tokens=8, steps=8, block_length=4, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], SamplingParams(seed=seed, **p))[0]
    batched = llm.generate([[1, 2], [5, 6, 7]], [other, SamplingParams(seed=seed, **p)])[1]
    assert alone.token_ids == batched.token_ids
    twin = seed - 2 ** 64 if seed >= 2 ** 63 else seed + 2 ** 64
    if -(2 ** 63) <= twin < 2 ** 64:
        assert llm.generate([[5, 6, 7]], SamplingParams(seed=twin, **p))[0].token_ids == alone.token_ids


def test_model_limits_are_checked_when_the_request_meets_the_model(llm):
    cfg = llm.model.config
    with pytest.raises(SamplingParamsError, match="vocabulary") as e:
        llm.generate([[1, 2]], SamplingParams(top_k=cfg.vocab_size + 1, max_tokens=4))
    assert e.value.field == "top_k"
    assert llm.generate([[1, 2]], SamplingParams(top_k=cfg.vocab_size, max_tokens=4, steps=4))[0].finished
    assert not llm.engine.has_unfinished()


def test_a_params_object_mutated_after_construction_is_still_refused(llm):
    p = SamplingParams(max_tokens=4)
    p.seed = 2 ** 70
    with pytest.raises(SamplingParamsError, match="seed"):
        llm.generate([[1, 2]], p)
    assert not llm.engine.has_unfinished()


def test_a_value_the_engine_cannot_represent_fails_its_request_alone(llm):
    """Below the validation: the engine builds each request's parameter tensors when the request is added, so an
    unrepresentable value fails add_request and the requests already queued run as if it never came."""
    good = SamplingParams(max_tokens=8, steps=8, block_length=4, ignore_eos=True)
    expected = llm.generate([[4, 5, 6]], good)[0]
    eng = llm.engine
    eng.add_request("good", [4, 5, 6], llm.resolve_params(good, 1)[0])
    bad = dataclasses.replace(llm.resolve_params(good, 1)[0], seed=2 ** 70, top_k=2 ** 64)
    with pytest.raises((OverflowError, RuntimeError, ValueError)):
        eng.add_request("bad", [1, 2, 3], bad)
    assert "bad" not in eng.requests
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in outs] == ["good"] and outs[0].token_ids == expected.token_ids
    assert eng.allocator.num_used == 0


def test_dream_schedule_builds_its_timesteps_once_not_per_step(make_checkpoint):
    llm = LLM(make_checkpoint("dream"), kv_cache_memory=1 << 22, page_size=8)
    p = SamplingParams(max_tokens=4, steps=16, block_length=4, algorithm="dream", ignore_eos=True)
    from engine.decoding.transfer import dream as schedule
    schedule.dream_ratios.cache_clear()
    out = llm.generate([[1, 2, 3]], p)[0]
    assert len(out.token_ids) == 4 and out.steps == 16
    assert schedule.dream_ratios.cache_info().misses == 1  # one linspace per (steps, eps), not one per step


def test_bad_requests_in_async_engine_raise_request_errors_and_others_finish(llm):
    good = SamplingParams(max_tokens=8, steps=8, block_length=4, ignore_eos=True)
    expected = llm.generate([[7, 7]], good)[0]
    mutated = SamplingParams(max_tokens=4)
    mutated.top_k = 2 ** 63

    async def main():
        async with AsyncEngine(llm) as eng:
            task = asyncio.create_task(eng.generate([7, 7], good))
            await asyncio.sleep(0)
            for p in (mutated, SamplingParams(top_k=llm.model.config.vocab_size + 5)):
                with pytest.raises(SamplingParamsError) as e:
                    eng.add_request([1, 2], p)
                assert e.value.field == "top_k"
            return await task, eng.stats

    out, stats = asyncio.run(main())
    assert out.token_ids == expected.token_ids and stats.failed == 0 and stats.finished == 1


def test_context_length_is_enforced_before_the_prompt_is_scanned(make_checkpoint):
    llm = LLM(make_checkpoint("llada", max_position_embeddings=64), kv_cache_memory=1 << 22, page_size=8)
    assert llm.limits.max_model_len == 64
    assert llm.generate([[1] * 60], SamplingParams(max_tokens=4, steps=4))[0].finished
    with pytest.raises(RequestTooLargeError, match="context length of 64") as e:
        llm.generate([[1] * 61], SamplingParams(max_tokens=4))
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestTooLargeError) as e:
        llm.generate([[1] * 20_000], SamplingParams(max_tokens=4))
    assert e.value.param == "prompts[0]"
    with pytest.raises(RequestTooLargeError, match="max_tokens"):
        llm.generate([[1]], SamplingParams(max_tokens=65))
    assert not llm.engine.has_unfinished() and llm.engine.allocator.num_used == 0


def test_max_tokens_near_the_hard_bound_is_refused_cheaply(llm):
    """The context check comes before the block plan (a tuple per block) is built or anything is allocated."""
    p = SamplingParams(max_tokens=2 ** 20, block_length=1)
    with pytest.raises(RequestTooLargeError) as e:
        p.resolve(llm.defaults, llm.limits)
    assert not isinstance(e.value, MemoryError) and isinstance(e.value, RequestError)
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestTooLargeError):
        llm.generate([[1, 2]], p)


def test_a_canvas_larger_than_the_kv_pool_is_a_request_fault(make_checkpoint):
    llm = LLM(make_checkpoint("llada"), kv_cache_memory=1 << 16, page_size=8)
    pool_tokens = llm.engine.allocator.num_pages * llm.engine.allocator.page_size
    assert pool_tokens < llm.limits.max_model_len
    with pytest.raises(RequestTooLargeError, match="KV pages") as e:
        llm.generate([[1, 2]], SamplingParams(max_tokens=pool_tokens))
    assert e.value.param == "max_tokens" and not isinstance(e.value, MemoryError)


def test_logits_working_set_is_bounded_and_chunking_changes_no_token(make_checkpoint):
    """A tiny logits budget splits each step's candidate pass into chunks of a few positions; every row of every
    compute_logits call stays within the chunk, and the tokens are those of one unbounded pass."""
    path = make_checkpoint("llada")
    params = [SamplingParams(max_tokens=24, block_length=12, steps=12, temperature=0.8, top_k=7, seed=3,
                             ignore_eos=True),
              SamplingParams(max_tokens=16, block_length=16, steps=8, cfg_scale=1.5, remasking="margin",
                             ignore_eos=True),
              SamplingParams(max_tokens=20, block_length=10, steps=10, remasking="entropy", top_p=0.7,
                             temperature=0.5, seed=9, cache="dual", ignore_eos=True),
              SamplingParams(max_tokens=18, block_length=9, threshold=0.3, remasking="random", seed=4,
                             cfg_scale=0.5, ignore_eos=True)]
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    wide = LLM(path, kv_cache_memory=1 << 22, page_size=8)
    assert wide.engine.runner.max_logit_rows >= 78
    expected = wide.generate(prompts, params)
    vocab = wide.model.config.vocab_size
    narrow = LLM(path, kv_cache_memory=1 << 22, page_size=8, logits_memory=5 * vocab * 64)
    assert narrow.engine.runner.max_logit_rows == 5
    real, rows = narrow.model.net.local_logits, []

    def recording(h):
        rows.append(h.shape[0])
        return real(h)

    narrow.model.net.local_logits = recording
    got = narrow.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert max(rows) == 5  # the first steps decode 12-16 positions per request: they were split
