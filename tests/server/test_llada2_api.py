"""The OpenAI-compatible API on a tiny random LLaDA2 (`llada2_moe`, block diffusion) checkpoint, in process (the
ASGI app over httpx), through the official `openai` client, against the engine's own LLM API on the same
checkpoint at the default dtype: chat (plain, streamed one delta per finished block, n > 1 with seeds), the step
stream (`include_steps`: replayed it rebuilds the LLM's tokens, and each block's steps come before its text),
/v1/completions (plain and streamed), token editing chosen by name, and /v1/models' defaults for this family.
The playground in a real browser: tests/server/test_playground_llada2_browser.py."""
from __future__ import annotations

import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from server.app import build_app
from server.config import ServerConfig
from server.engine_client import LocalEngineClient
from tests.conftest import FAMILY_DIMS
from unmask_client import DiffusionStep, StepCanvas

from .helpers import assert_block_deltas, assert_error, parse_sse, run

MESSAGES = [{"role": "user", "content": "What is 12 + 30?"}]
OPTS = {"block_length": 4, "threshold": 0.5, "ignore_eos": True}


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint("llada2_moe", **FAMILY_DIMS["llada2_moe"])


@pytest.fixture(scope="module")
def app(path):
    eng = LocalEngineClient.from_model(path, max_num_seqs=8, kv_cache_memory=1 << 24, page_size=4)
    yield build_app(eng, ServerConfig(served_model_names=["l2"]))
    run(eng.shutdown())


@pytest.fixture(scope="module")
def llm(path):
    return LLM(path)  # dtype auto, as the server


def call(app, fn):
    """Run fn(openai_client, httpx_client) against the app in process."""
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver",
                                     timeout=60) as hc:
            oc = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="x", http_client=hc, max_retries=0)
            return await fn(oc, hc)
    return run(main())


def block_ends(prompt_len: int, max_tokens: int, block: int) -> list[int]:
    """Offsets into the generated tokens where each denoised block ends (block-aligned canvas: the first block is
    the one holding the prompt's tail), cut to max_tokens."""
    ends, e = [], (prompt_len // block + 1) * block - prompt_len
    while True:
        ends.append(min(e, max_tokens))
        if e >= max_tokens:
            return ends
        e += block


@pytest.mark.parametrize("max_tokens", [14, 9])
def test_chat_plain_and_streamed_per_block(app, llm, max_tokens):
    want = llm.chat(MESSAGES, SamplingParams(max_tokens=max_tokens, temperature=0.0, **OPTS))[0]
    prompt_len = len(llm.model.apply_chat_template(MESSAGES))

    async def fn(oc, _):
        plain = await oc.chat.completions.create(model="l2", messages=MESSAGES, max_tokens=max_tokens,
                                                 temperature=0, extra_body=OPTS)
        stream = await oc.chat.completions.create(model="l2", messages=MESSAGES, max_tokens=max_tokens,
                                                  temperature=0, stream=True, extra_body=OPTS)
        return plain, [c async for c in stream]

    plain, chunks = call(app, fn)
    assert plain.choices[0].message.content == want.text
    assert plain.usage.completion_tokens == len(want.token_ids) and plain.usage.prompt_tokens == prompt_len
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    # one delta per finished block: the text the LLM's tokens have at each block's end, minus the one before
    texts = [llm.model.decode(want.token_ids[:e]) for e in block_ends(prompt_len, max_tokens, 4)]
    assert_block_deltas(deltas, texts)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_n_with_seeds_equals_the_llm(app, llm):
    opts = {**OPTS, "seed": 5}
    want = llm.chat([MESSAGES] * 2, [SamplingParams(max_tokens=10, temperature=0.8, **{**opts, "seed": 5 + i})
                                     for i in range(2)])
    got = call(app, lambda oc, _: oc.chat.completions.create(model="l2", messages=MESSAGES, max_tokens=10,
                                                             temperature=0.8, n=2, extra_body=opts))
    assert [c.message.content for c in sorted(got.choices, key=lambda c: c.index)] == [w.text for w in want]
    assert want[0].token_ids != want[1].token_ids  # the seeds differ, so do the answers


def test_step_stream_replays_to_the_llm_tokens(app, llm):
    """include_steps: every step once, in order, inside its block, before that block's text; replayed over an
    all-mask canvas it gives the LLM's tokens, and the step count is the LLM's."""
    sp = SamplingParams(max_tokens=13, temperature=0.0, **OPTS)
    want = llm.chat(MESSAGES, sp)[0]
    prompt_len = len(llm.model.apply_chat_template(MESSAGES))

    async def fn(_, hc):
        r = await hc.post("/v1/chat/completions", json={
            "model": "l2", "messages": MESSAGES, "max_tokens": 13, "temperature": 0, "stream": True, **OPTS,
            "stream_options": {"include_steps": True, "include_usage": True}})
        assert r.status_code == 200, r.text
        return parse_sse(r.text)

    events = [e for e in call(app, fn) if e != "[DONE]"]
    mask = llm.model.config.mask_id
    canvas, steps, blocks_seen, text = [mask] * 13, [], [], ""
    ends = block_ends(prompt_len, 13, 4)
    for ev in events:
        for ch in ev["choices"]:
            if "diffusion_step" in ch:
                s = ch["diffusion_step"]
                steps.append(s)
                b0, b1 = s["block"]
                assert s["length"] == 13 and (b0, b1) in zip([0, *ends], ends), s
                assert all(b0 <= p < b1 and canvas[p] == mask for p in s["positions"]), s
                for p, t in zip(s["positions"], s["token_ids"]):
                    canvas[p] = t
                if not blocks_seen or blocks_seen[-1] != b1:
                    blocks_seen.append(b1)
            elif ch.get("delta", {}).get("content"):
                text += ch["delta"]["content"]
                # the block's text comes after all its steps: the canvas holds it up to the block's end
                assert llm.model.decode(canvas[:blocks_seen[-1]]).startswith(text)
                assert mask not in canvas[:blocks_seen[-1]]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1)) and len(steps) == want.steps
    assert canvas == want.token_ids and text == want.text
    assert blocks_seen == ends


def test_completions_plain_and_streamed(app, llm):
    prompt = "hello there, block diffusion"
    want = llm.generate(prompt, SamplingParams(max_tokens=11, temperature=0.0, **OPTS))[0]

    async def fn(oc, _):
        plain = await oc.completions.create(model="l2", prompt=prompt, max_tokens=11, temperature=0, extra_body=OPTS)
        stream = await oc.completions.create(model="l2", prompt=prompt, max_tokens=11, temperature=0, stream=True,
                                             extra_body=OPTS)
        return plain, [c async for c in stream]

    plain, chunks = call(app, fn)
    assert plain.choices[0].text == want.text
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(pieces) == want.text and len(pieces) >= 2


def test_editing_by_name_over_http(app, llm):
    extra = {**OPTS, "editing": "llada2.1-edit", "editing_threshold": 0.05, "max_post_steps": 2}
    want = llm.chat(MESSAGES, SamplingParams(max_tokens=12, temperature=0.0, **extra))[0]
    plain = llm.chat(MESSAGES, SamplingParams(max_tokens=12, temperature=0.0, **OPTS))[0]
    got = call(app, lambda oc, _: oc.chat.completions.create(model="l2", messages=MESSAGES, max_tokens=12,
                                                             temperature=0, extra_body=extra))
    assert got.choices[0].message.content == want.text
    assert want.token_ids != plain.token_ids  # editing changed the answer here

    async def bad(_, hc):
        return await hc.post("/v1/chat/completions", json={"model": "l2", "messages": MESSAGES, "max_tokens": 4,
                                                           "editing": "no-such-rule"})
    assert "llada2.1-edit" in assert_error(call(app, bad), 400, "editing")["message"]


def test_models_card_reports_per_block_steps(app):
    async def fn(_, hc):
        return (await hc.get("/v1/models")).json()["data"][0]
    card = call(app, fn)
    d = card["diffusion_defaults"]
    assert card["family"] == "llada2_moe"
    # unset steps = 32 per denoised block, not a total a client could send back
    assert (d["steps"], d["steps_per_block"], d["block_length"], d["algorithm"]) == (None, 32, 32, "llada2")


def test_step_stream_carries_edits(app, llm):
    """Token editing: steps also carry the committed tokens they replaced (edited_positions / edited_token_ids /
    edited_tokens); replaying commits then edits, step by step, rebuilds the LLM's tokens (which the edits change)."""
    extra = {**OPTS, "editing_threshold": 0.05, "max_post_steps": 2}
    want = llm.chat(MESSAGES, SamplingParams(max_tokens=12, temperature=0.0, **extra))[0]

    async def fn(_, hc):
        r = await hc.post("/v1/chat/completions", json={
            "model": "l2", "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True, **extra,
            "stream_options": {"include_steps": True}})
        assert r.status_code == 200, r.text
        return parse_sse(r.text)

    steps = [ch["diffusion_step"] for e in call(app, fn) if e != "[DONE]" for ch in e["choices"]
             if "diffusion_step" in ch]
    mask = llm.model.config.mask_id
    canvas, fills_only, edits = [mask] * 12, [mask] * 12, 0
    tok = llm.model.tokenizer
    for s in steps:
        for p, t in zip(s["positions"], s["token_ids"]):
            assert canvas[p] == mask
            canvas[p] = fills_only[p] = t
        for p, t in zip(s.get("edited_positions", []), s.get("edited_token_ids", [])):
            assert canvas[p] not in (mask, t) and s["block"][0] <= p < s["block"][1], s  # a real change in its block
            canvas[p] = t
            edits += 1
        assert s.get("edited_tokens", []) == [tok.decode([t], skip_special_tokens=False)
                                              for t in s.get("edited_token_ids", [])]
    assert canvas == want.token_ids and len(steps) == want.steps
    assert edits >= 1 and fills_only != canvas  # the edits are what makes the replay right
    sdk = StepCanvas()  # the SDK's replay applies the edits too
    for s in steps:
        sdk.apply(DiffusionStep.model_validate(s))
    assert sdk.token_ids == want.token_ids
