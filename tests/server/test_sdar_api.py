"""SDAR (`sdar`, block-diffusion Qwen3) over the OpenAI-compatible API, in process, through the official `openai`
client, against the engine's own LLM on the same tiny random checkpoint (default dtype): the ChatML chat answer,
streamed one delta per finished block, /v1/completions, and the family's defaults on /v1/models."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from server.app import build_app
from server.config import ServerConfig
from server.engine_client import LocalEngineClient
from tests.conftest import FAMILY_DIMS

from .helpers import assert_block_deltas, run
from .test_llada2_api import block_ends, call

MESSAGES = [{"role": "user", "content": "What is 12 + 30?"}]
OPTS = {"block_length": 4, "threshold": 0.1, "ignore_eos": True}


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint("sdar", **FAMILY_DIMS["sdar"])


@pytest.fixture(scope="module")
def app(path):
    eng = LocalEngineClient.from_model(path, max_num_seqs=4, kv_cache_memory=1 << 24, page_size=4)
    yield build_app(eng, ServerConfig(served_model_names=["sdar"]))
    run(eng.shutdown())


def test_sdar_chat_stream_completions_and_defaults(app, path):
    llm = LLM(path)
    want = llm.chat(MESSAGES, SamplingParams(max_tokens=11, temperature=0.0, **OPTS))[0]
    prompt_len = len(llm.model.apply_chat_template(MESSAGES))
    raw = llm.generate("sort 3 1 2", SamplingParams(max_tokens=7, temperature=0.0, **OPTS))[0]

    async def fn(oc, hc):
        plain = await oc.chat.completions.create(model="sdar", messages=MESSAGES, max_tokens=11, temperature=0,
                                                 extra_body=OPTS)
        stream = [c async for c in await oc.chat.completions.create(
            model="sdar", messages=MESSAGES, max_tokens=11, temperature=0, stream=True, extra_body=OPTS)]
        comp = await oc.completions.create(model="sdar", prompt="sort 3 1 2", max_tokens=7, temperature=0,
                                           extra_body=OPTS)
        card = (await hc.get("/v1/models")).json()["data"][0]
        return plain, stream, comp, card

    plain, stream, comp, card = call(app, fn)
    assert plain.choices[0].message.content == want.text
    texts = [llm.model.decode(want.token_ids[:e]) for e in block_ends(prompt_len, 11, 4)]
    deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert_block_deltas(deltas, texts)
    assert comp.choices[0].text == raw.text
    d = card["diffusion_defaults"]
    assert card["family"] == "sdar"
    assert (d["steps"], d["steps_per_block"], d["block_length"], d["threshold"], d["temperature"]) == (
        None, 4, 4, 0.85, 1.0)
