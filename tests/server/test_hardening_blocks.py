"""The hardening tests (test_hardening.py) on block-diffusion checkpoints (tiny random llada2_moe and sdar, their
family defaults, dtype auto): what careless and hostile clients sent to the request fields these families brought
(block_length, cache, editing, structured outputs on a model without them). In process (ASGI) over the real engine,
plus the engine's own LLM API for the same checks."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.errors import RequestTooLargeError
from server.app import build_app
from server.config import ServerConfig
from tests.conftest import FAMILY_DIMS

from .helpers import assert_error, client, local_engine, run

MESSAGES = [{"role": "user", "content": "hi"}]
FAMILIES = ("llada2_moe", "sdar")
CONTEXT = 256  # max_position_embeddings of the test checkpoints: small, so an over-long canvas is cheap to ask for


@pytest.fixture(scope="module", params=FAMILIES)
def path(request, make_checkpoint):
    return make_checkpoint(request.param, **FAMILY_DIMS[request.param], max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def app(path):
    with local_engine(path, max_num_seqs=8, kv_cache_memory=1 << 24, page_size=4) as eng:
        yield build_app(eng, ServerConfig(served_model_names=["m"]))


def post(app, body, path="/v1/chat/completions"):
    async def main():
        async with client(app) as c:
            return await c.post(path, json=body)
    return run(main())


@pytest.mark.parametrize("block_length", [CONTEXT + 1, 100_000, 1 << 20])
def test_a_block_longer_than_the_context_is_a_400_naming_block_length(app, block_length):
    """The block-aligned canvas (prompt + max_tokens rounded up to whole blocks) must fit the context: a short
    request with a huge block_length once built a canvas (and block-causal masks) of block_length positions, and
    100_000 took a server past 19 GiB until the kernel killed it."""
    r = post(app, {"messages": MESSAGES, "max_tokens": 8, "block_length": block_length})
    err = assert_error(r, 400, "block_length")
    assert str(CONTEXT) in err["message"]
    r = post(app, {"prompt": "hi", "max_tokens": 8, "block_length": block_length}, "/v1/completions")
    assert_error(r, 400, "block_length")
    ok = post(app, {"messages": MESSAGES, "max_tokens": 8, "block_length": 16})  # the server still serves
    assert ok.status_code == 200, ok.text


def test_the_engine_refuses_a_canvas_beyond_the_context(path):
    llm = LLM(path)
    with pytest.raises(RequestTooLargeError) as e:
        llm.generate("hi", SamplingParams(max_tokens=8, block_length=CONTEXT + 4))
    assert e.value.param == "block_length"
    # the largest block that fits still runs: the prompt's block rounds the canvas up to exactly the context
    out = llm.generate([1, 2, 3], SamplingParams(max_tokens=4, block_length=CONTEXT, steps=1, ignore_eos=True))[0]
    assert len(out.token_ids) == 4


def _app_with(path, **limits):
    """A second app on a fresh engine with the given request limits (module engines are per fixture)."""
    from server.limits import RequestLimits
    return local_engine(path, max_num_seqs=8, kv_cache_memory=1 << 24, page_size=4), RequestLimits(**limits)


@pytest.mark.parametrize("editing", [False, True])
def test_the_work_bound_counts_every_block_and_edit_step(path, editing):
    """n x steps must count what a choice can really run: with `steps` unset a block-diffusion choice takes the
    family's steps per block for EVERY denoised block (the bound counted them once: n=128 at max_tokens 2048 passed
    as 128 x 32 steps while it could run 128 x 2048), and token editing adds up to max_post_steps + 1 steps per
    block. The budget is computed here from the block geometry (engine/block_diffusion.py's docstring)."""
    llm_defaults = LLM(path).defaults
    per_block = llm_defaults.steps  # the family's steps per block (llada2_moe 32, sdar 4)
    prompt, max_tokens, block = [5, 6, 7, 8, 9], 64, 8
    blocks = -(-(len(prompt) + max_tokens) // block) - len(prompt) // block  # 9
    extra = {"editing": "llada2.1-edit", "max_post_steps": 5} if editing else {}
    budget = blocks * min(per_block, max_tokens) + (blocks * (5 + 1) if editing else 0)
    ctx, limits = _app_with(path, max_request_steps=2 * budget)
    with ctx as eng:
        app = build_app(eng, ServerConfig(served_model_names=["m"], limits=limits))
        body = {"prompt": prompt, "max_tokens": max_tokens, "block_length": block, **extra}
        err = assert_error(post(app, {**body, "n": 3}, "/v1/completions"), 400, "steps")
        assert f"3 choices x {budget} steps" in err["message"]
        r = post(app, {**body, "n": 2, "max_tokens": 8}, "/v1/completions")  # a smaller request still runs
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("field", ["response_format", "tools"])
def test_structured_outputs_refused_naming_the_field_sent(app, field):
    """A model without constrained decoding names the field the client sent (not structured_outputs), before any
    grammar is compiled."""
    body = {"messages": MESSAGES, "max_tokens": 8}
    if field == "response_format":
        body["response_format"] = {"type": "json_object"}
    else:
        body.update(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                    tool_choice="required")
    err = assert_error(post(app, body), 400, field)
    assert err["message"].startswith(field) and "block diffusion" in err["message"]
