"""`unmask serve --model DIR` on a tiny random LLaDA2 (`llada2_moe`) checkpoint in the real on-disk format, at the
default dtype, through the official openai client: the chat template (Ling `<role>HUMAN</role>` format), answers
equal to the offline LLM's, streaming one delta per finished block, the family's defaults on /v1/models, token
editing per request, and 400s naming the field for options this family does not have."""
from __future__ import annotations

import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from tests.conftest import FAMILY_DIMS

from .serve_process import ServeProcess

MESSAGES = [{"role": "user", "content": "What is 12 + 30?"}]
OPTS = {"max_tokens": 14, "block_length": 4, "threshold": 0.5, "ignore_eos": True}


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint("llada2_moe", **FAMILY_DIMS["llada2_moe"])


@pytest.fixture(scope="module")
def server(path):
    srv = ServeProcess("--model", str(path), "--served-model-name", "l2")
    yield srv
    srv.stop()


@pytest.mark.slow
def test_serve_llada2_chat_stream_defaults_and_errors(server, path):
    llm = LLM(path)  # dtype auto, as the server
    prompt = llm.model.apply_chat_template(MESSAGES)
    assert llm.model.decode(prompt, skip_special_tokens=False).startswith("<role>SYSTEM</role>")
    assert "<role>HUMAN</role>What is 12 + 30?<|role_end|><role>ASSISTANT</role>" in llm.model.decode(
        prompt, skip_special_tokens=False)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    for extra in ({}, {"editing_threshold": 0.3, "max_post_steps": 2}, {"cache": "none"}):
        body = {k: v for k, v in {**OPTS, **extra}.items() if k != "max_tokens"}
        got = client.chat.completions.create(model="l2", messages=MESSAGES, max_tokens=14, temperature=0,
                                             extra_body=body)
        want = llm.chat(MESSAGES, SamplingParams(**OPTS, **extra, temperature=0.0))[0]
        assert got.choices[0].message.content == want.text, extra
    body = {k: v for k, v in OPTS.items() if k != "max_tokens"}
    chunks = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="l2", messages=MESSAGES, max_tokens=14, temperature=0, stream=True, extra_body=body)
        if c.choices and c.choices[0].delta.content]
    full = client.chat.completions.create(model="l2", messages=MESSAGES, max_tokens=14, temperature=0,
                                          extra_body=body).choices[0].message.content
    assert "".join(chunks) == full and len(chunks) >= 2  # one delta per finished block (14 tokens, blocks of 4)
    models = httpx.get(server.url + "/v1/models").json()["data"][0]
    d = models["diffusion_defaults"]
    assert (models["family"], d["block_length"], d["threshold"], d["cache"], d["algorithm"]) == (
        "llada2_moe", 32, 0.95, "block", "llada2")
    for field, value in (("algorithm", "dream"), ("factor", 1.0), ("cfg_scale", 1.0)):
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "l2", "messages": MESSAGES,
                                                                   "max_tokens": 4, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
