"""Stop tokens and determinism: every id of a list-valued eos_token_id (config.json and generation_config.json)
ends generation; unseeded requests get a fresh seed, recorded in the output, that replays them exactly."""
from __future__ import annotations

import json
import shutil

import pytest

from engine import LLM, AsyncEngine, SamplingParams
from engine.errors import CheckpointError


def edited_copy(src, dst, **edits):
    shutil.copytree(src, dst)
    for name, changes in edits.items():
        path = dst / f"{name}.json"
        cfg = json.loads(path.read_text())
        cfg.update(changes)
        path.write_text(json.dumps(cfg))
    return dst


def test_every_listed_eos_id_ends_generation(make_checkpoint, tmp_path):
    src = make_checkpoint("llada")
    base = LLM(src, kv_cache_memory=1 << 22, page_size=8)
    p = dict(max_tokens=16, steps=16, block_length=4)
    full = base.generate([[3, 4, 5]], SamplingParams(ignore_eos=True, **p))[0].token_ids
    eos = base.model.config.eos_id
    assert eos not in full[:10]
    a, b = full[3], next(t for t in full[6:] if t not in full[:6])  # b first occurs after position 5
    llm = LLM(edited_copy(src, tmp_path / "ck", config={"eos_token_id": [eos, a]},
                          generation_config={"eos_token_id": [b, eos]}), kv_cache_memory=1 << 22, page_size=8)
    assert {eos, a, b} <= set(llm.model.config.stop_ids) and llm.model.config.stop_ids[0] == eos
    out = llm.generate([[3, 4, 5]], SamplingParams(**p))[0]
    assert out.finish_reason == "stop" and out.token_ids == full[:full.index(a)]
    only_b = LLM(edited_copy(src, tmp_path / "ck2", generation_config={"eos_token_id": [b]}),
                 kv_cache_memory=1 << 22, page_size=8)
    out = only_b.generate([[3, 4, 5]], SamplingParams(**p))[0]
    assert out.finish_reason == "stop" and out.token_ids == full[:full.index(b)]


def test_an_eos_id_outside_the_vocabulary_is_named(make_checkpoint, tmp_path):
    src = make_checkpoint("llada")
    with pytest.raises(CheckpointError, match="generation_config.json.*eos_token_id"):
        LLM(edited_copy(src, tmp_path / "ck", generation_config={"eos_token_id": [1, 10 ** 9]}))


def test_unseeded_requests_record_a_seed_that_replays_them(make_checkpoint):
    llm = LLM(make_checkpoint("dream"), kv_cache_memory=1 << 22, page_size=8)
    p = dict(max_tokens=12, steps=6, block_length=12, algorithm="dream", remasking="origin", temperature=0.0,
             ignore_eos=True)
    runs = [llm.generate([[1, 2, 3]], SamplingParams(**p))[0] for _ in range(4)]
    assert all(isinstance(o.seed, int) for o in runs) and len({o.seed for o in runs}) == 4
    for o in runs:
        assert llm.generate([[1, 2, 3]], SamplingParams(seed=o.seed, **p))[0].token_ids == o.token_ids
    assert len({tuple(o.token_ids) for o in runs}) > 1  # origin at temperature 0 is random without a seed

    async def streamed():
        async with AsyncEngine(llm) as eng:
            return [o async for o in eng.add_request([1, 2, 3], SamplingParams(seed=77, **p))]

    import asyncio
    outs = asyncio.run(streamed())
    assert all(o.seed == 77 for o in outs)
