"""The SDK's step streams (`include_steps=True`, DiffusionStep, StepCanvas) against the real server.

Reference: the offline `LLM` on the same checkpoint: the replayed canvas, cut at the first stop token, is its output.
"""
from __future__ import annotations

import httpx
import pytest

from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine
from engine.bundled import DEFAULT_MODEL_DIR, task
from engine.outputs import cut_at_stop_token
from server.app import build_app
from server.config import ServerConfig
from server.engine_client import LocalEngineClient

from .helpers import run
from .serve_process import ServeProcess

unmask_client = pytest.importorskip("unmask_client")
if not hasattr(unmask_client, "StepCanvas"):
    pytest.skip("the installed unmask_client predates step streams (pip install -e clients/python)",
                allow_module_level=True)

DTYPE = "float32"
OPTS = {"max_tokens": 16, "steps": 16, "block_length": 8}


@pytest.fixture(scope="module")
def ref():
    return LLM(DEFAULT_MODEL_DIR, dtype=DTYPE)


def _check(chunks: list, ref: LLM, question: str) -> None:
    canvas = unmask_client.StepCanvas()
    content = ""
    for ch in chunks:
        if ch.step is not None:
            assert ch.text == ""
            masked = canvas.masked if canvas.steps else ch.step.length
            canvas.apply(ch.step)
            assert canvas.masked == masked - len(ch.step.positions)
        content += ch.text
    exp = ref.chat(task.messages_for(question), SamplingParams(**OPTS))[0]
    cfg = ref.model.config
    ids = [cfg.mask_id if t is None else t for t in canvas.token_ids]
    assert cut_at_stop_token(ids, cfg.stop_ids)[0] == exp.token_ids
    assert canvas.steps == exp.steps and content == exp.text == task.solve(question)
    assert canvas.render().startswith("".join(canvas.pieces[:len(exp.token_ids)]))


def test_async_client_step_stream(ref):
    engine = LocalEngineClient(AsyncEngine(ref))  # the reference LLM, served (offline calls resume after shutdown)
    app = build_app(engine, ServerConfig(served_model_names=["tiny"]))
    (q, _), = task.make_problems(1, seed=21, split="held_out")

    async def main():
        async with unmask_client.AsyncClient("http://testserver", transport=httpx.ASGITransport(app=app)) as c:
            card = (await c.models())[0]
            steps = [ch async for ch in await c.chat(task.messages_for(q), stream=True, include_steps=True, **OPTS)]
            plain = [ch async for ch in await c.chat(task.messages_for(q), stream=True, **OPTS)]
            with pytest.raises(ValueError, match="include_steps"):
                await c.chat(task.messages_for(q), include_steps=True)
            return card, steps, plain

    try:
        card, steps, plain = run(main())
    finally:
        run(engine.shutdown())
    assert card.diffusion_defaults["max_tokens"] == 16 and card.special_tokens["mask_token_id"] == 35
    _check(steps, ref, q)
    assert all(ch.step is None for ch in plain)
    assert "".join(ch.text for ch in plain) == "".join(ch.text for ch in steps)


@pytest.mark.slow
def test_client_step_stream_against_unmask_serve(ref):
    server = ServeProcess("--dtype", DTYPE)
    (q, _), = task.make_problems(1, seed=22, split="held_out")
    try:
        with unmask_client.Client(server.url) as c:
            with c.chat(task.messages_for(q), stream=True, include_steps=True, **OPTS) as stream:
                chunks = list(stream)
            completion = list(c.complete("sort 2 1", stream=True, include_steps=True, max_tokens=8, block_length=4))
    finally:
        server.stop()
    _check(chunks, ref, q)
    canvas = unmask_client.StepCanvas()
    for ch in completion:
        if ch.step:
            canvas.apply(ch.step)
    exp = ref.generate("sort 2 1", SamplingParams(max_tokens=8, block_length=4))[0]
    ids = [ref.model.config.mask_id if t is None else t for t in canvas.token_ids]
    assert cut_at_stop_token(ids, ref.model.config.stop_ids)[0] == exp.token_ids


def test_step_canvas_refuses_out_of_order_or_repeated_commits():
    step = unmask_client.DiffusionStep
    canvas = unmask_client.StepCanvas()
    with pytest.raises(ValueError, match="in order"):
        canvas.apply(step(step=2, block=[0, 4], length=4, positions=[1], token_ids=[5], tokens=["5"]))
    canvas.apply(step(step=1, block=[0, 4], length=4, positions=[1, 3], token_ids=[5, 6], tokens=["5", "6"]))
    assert canvas.render() == "░5░6" and canvas.masked == 2 and canvas.step_of == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="committed twice"):
        canvas.apply(step(step=2, block=[0, 4], length=4, positions=[3], token_ids=[7], tokens=["7"]))
