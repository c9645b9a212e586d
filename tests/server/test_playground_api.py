"""The step stream behind the playground (`stream_options.include_steps`), its cost rule, and the page's routes.

Reference: the offline `LLM` API on the same checkpoint (its own generate loop): replaying the streamed steps over an
all-mask canvas must give exactly the tokens it generates."""
from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine
from engine.bundled import DEFAULT_MODEL_DIR, task
from engine.outputs import cut_at_stop_token
from server.app import build_app
from server.config import ServerConfig
from server.engine_client import LocalEngineClient

from .helpers import client, local_engine, parse_sse, run

DTYPE = "float32"


class SpyClient:
    """The real LocalEngineClient, recording the keyword arguments of every add()."""

    def __init__(self, inner: LocalEngineClient) -> None:
        self.inner, self.add_kwargs = inner, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def add(self, *args: Any, **kwargs: Any) -> Any:
        self.add_kwargs.append(kwargs)
        return self.inner.add(*args, **kwargs)


@pytest.fixture(scope="module")
def engine():
    with local_engine(DEFAULT_MODEL_DIR, dtype=DTYPE, max_num_seqs=8, kv_cache_memory=1 << 24) as eng:
        yield SpyClient(eng)


@pytest.fixture(scope="module")
def app(engine):
    return build_app(engine, ServerConfig(served_model_names=["tiny"]))


@pytest.fixture(scope="module")
def ref():
    return LLM(DEFAULT_MODEL_DIR, dtype=DTYPE)


def _post(app: Any, path: str, body: dict[str, Any]) -> tuple[int, list[Any]]:
    async def main():
        async with client(app) as c:
            r = await c.post(path, json=body)
            return r.status_code, (parse_sse(r.text) if r.status_code == 200 else r.text)
    return run(main())


def _steps_by_choice(events: list[Any]) -> tuple[dict[int, list[dict]], dict[int, str], dict[int, dict]]:
    """Per choice: its step events, its content and its final chunk; asserts each step comes before the final."""
    steps: dict[int, list[dict]] = {}
    content: dict[int, str] = {}
    final: dict[int, dict] = {}
    for ev in events:
        if ev == "[DONE]":
            continue
        for ch in ev["choices"]:
            i = ch["index"]
            if "diffusion_step" in ch:
                assert i not in final, "a step arrived after its choice finished"
                assert ch["finish_reason"] is None and ch.get("delta", {}) == {} and ch.get("text", "") == ""
                steps.setdefault(i, []).append(ch["diffusion_step"])
            content[i] = content.get(i, "") + (ch.get("delta", {}).get("content") or ch.get("text") or "")
            if ch["finish_reason"] is not None:
                final[i] = ch
    return steps, content, final


def _replay(steps: list[dict], mask_id: int) -> list[int]:
    """Replay the steps over an all-mask canvas, checking order, bounds and that no position is committed twice."""
    length = steps[0]["length"]
    canvas = [mask_id] * length
    for k, s in enumerate(steps, start=1):
        assert s["step"] == k, [x["step"] for x in steps]
        assert s["length"] == length
        b0, b1 = s["block"]
        assert 0 <= b0 < b1 <= length
        assert len(s["positions"]) == len(s["token_ids"]) == len(s["tokens"])
        assert s["positions"] == sorted(s["positions"])
        for p, t in zip(s["positions"], s["token_ids"]):
            assert b0 <= p < b1, (p, s["block"])
            assert canvas[p] == mask_id, f"position {p} committed twice"
            canvas[p] = t
    return canvas


OPTIONS = [{}, {"block_length": 4, "max_tokens": 16}, {"cache": "dual", "threshold": 0.9, "block_length": 8},
           {"steps": 8, "remasking": "margin"}, {"temperature": 0.8, "seed": 11, "n": 2, "block_length": 8}]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_steps_in_order_rebuild_the_offline_output(app, ref, opts):
    (q, _), = task.make_problems(1, seed=len(str(opts)), split="held_out")
    status, events = _post(app, "/v1/chat/completions", {
        "messages": task.messages_for(q), "stream": True, **opts,
        "stream_options": {"include_steps": True, "include_usage": True}})
    assert status == 200, events
    n = opts.get("n", 1)
    sp = {k: v for k, v in opts.items() if k != "n"}
    expected = ref.chat([task.messages_for(q)] * n,
                        [SamplingParams(**{**sp, **({"seed": sp["seed"] + i} if i else {})}) for i in range(n)])
    steps, content, final = _steps_by_choice(events)
    cfg = ref.model.config
    tok = ref.model.tokenizer
    assert sorted(steps) == list(range(n))
    for i, exp in enumerate(expected):
        canvas = _replay(steps[i], cfg.mask_id)
        assert cut_at_stop_token(canvas, cfg.stop_ids)[0] == exp.token_ids
        for s in steps[i]:  # text pieces are the tokens' own text
            assert s["tokens"] == [tok.decode([t], skip_special_tokens=False) for t in s["token_ids"]]
        assert content[i] == exp.text
        d = final[i]["diffusion"]
        assert d["steps"] == len(steps[i]) == exp.steps
        assert d["tokens_committed"] == sum(len(s["positions"]) for s in steps[i])


def test_completions_stream_steps_and_plain_streams_send_none(app, engine, ref):
    prompt = "sort 4 2 7"
    body = {"prompt": prompt, "max_tokens": 12, "block_length": 4, "stream": True}
    engine.add_kwargs.clear()
    status, with_steps = _post(app, "/v1/completions", {**body, "stream_options": {"include_steps": True}})
    assert status == 200
    steps, content, _ = _steps_by_choice(with_steps)
    exp = ref.generate(prompt, SamplingParams(max_tokens=12, block_length=4))[0]
    canvas = _replay(steps[0], ref.model.config.mask_id)
    assert cut_at_stop_token(canvas, ref.model.config.stop_ids)[0] == exp.token_ids
    for plain in ({}, {"stream_options": {"include_usage": True}}, {"stream_options": {"include_steps": False}}):
        status, events = _post(app, "/v1/completions", {**body, **plain})
        assert status == 200
        chunks = [e for e in events if e != "[DONE]"]
        assert not any("diffusion_step" in ch for e in chunks for ch in e["choices"])
        text = "".join(ch["text"] for e in chunks for ch in e["choices"])
        assert text == content[0] == exp.text
        # one chunk per finished block at most (3 blocks), plus the usage chunk: nothing per step
        assert len([e for e in chunks if e["choices"]]) <= 3
    # only the request that asked made the engine record its steps
    assert engine.add_kwargs == [{"record_steps": True}, {}, {}, {}]


def test_step_options_need_stream(app):
    status, text = _post(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "sort 1 2"}],
                                                       "stream_options": {"include_steps": True}})
    assert status == 400 and "stream_options" in text


def test_slow_consumer_gets_every_step_without_a_queue_per_step(ref):
    """A consumer that reads nothing until the request has finished still gets every step (from the log), while
    the stream kept at most one undelivered output for it (wake-ups replace each other, like block outputs)."""
    llm = ref
    prompt = llm.model.apply_chat_template(task.messages_for("reverse 1 2 3 4 5"))
    params = SamplingParams(max_tokens=24, steps=24, block_length=8, ignore_eos=True)
    expected = llm.generate(prompt, params)[0]

    async def main():
        async with AsyncEngine(llm) as eng:
            fast = [o async for o in eng.add_request(prompt, params, record_steps=True)]
            plain = [o async for o in eng.add_request(prompt, params)]
            stream = eng.add_request(prompt, params, record_steps=True)
            first = await stream.__anext__()  # the request is running; now stop reading until it has finished
            while eng.stats.finished < 3:
                await asyncio.sleep(0.01)
            slow = [first] + [o async for o in stream]
            return fast, plain, slow

    fast, plain, slow = run(main())
    blocks = 3
    assert [o.step_log for o in plain] == [None] * blocks and plain[-1].token_ids == expected.token_ids
    assert blocks <= len(fast) <= expected.steps  # woken after each step (steps it was too slow for coalesce)
    assert len(slow) <= 3  # the first output, the one latest output kept while not reading, the final one
    for outs in (fast, slow):
        log = outs[-1].step_log
        assert log.num_steps == expected.steps == 24
        assert [s.step for s in log.since(0)] == list(range(1, 25))
        assert log.canvas(llm.model.config.mask_id) == expected.token_ids
        assert all(not o.finished for o in outs[:-1]) and outs[-1].finished


def test_models_card_exposes_defaults_and_special_tokens(engine, ref):
    info = engine.info
    app = build_app(engine, ServerConfig(served_model_names=["tiny"], sampling_defaults={"steps": 8, "cache": "dual"}))

    async def main():
        async with client(app) as c:
            return (await c.get("/v1/models")).json()

    card = run(main())["data"][0]
    d = card["diffusion_defaults"]
    assert d["max_tokens"] == info.defaults.max_tokens == 16 and d["block_length"] == info.defaults.block_length
    assert d["remasking"] == info.defaults.remasking and d["temperature"] == info.defaults.temperature
    assert d["steps"] == 8 and d["cache"] == "dual"  # server-wide defaults win over the model's
    assert d["threshold"] is None and d["seed"] is None
    cfg = ref.model.config
    assert card["special_tokens"] == {"mask_token_id": cfg.mask_id, "eos_token_id": cfg.eos_id,
                                      "stop_token_ids": list(cfg.stop_ids)}


@pytest.mark.parametrize("key", [None, "s3cret"])
def test_playground_page_is_served_and_self_contained(engine, key):
    app = build_app(engine, ServerConfig(served_model_names=["tiny"], api_key=key))

    async def main():
        async with client(app) as c:
            root = await c.get("/", follow_redirects=False)
            files = {p: await c.get(p) for p in ("/playground", "/playground.js", "/playground.css")}
            models = await c.get("/v1/models")
            return root, files, models

    root, files, models = run(main())
    assert root.status_code == 307 and root.headers["location"] == "/playground"
    for path, r in files.items():
        assert r.status_code == 200, path  # public even with a key: the page asks for the key itself
        assert "'self'" in r.headers["content-security-policy"]
        assert "://" not in r.text, f"{path} refers to another origin"
    assert files["/playground"].headers["content-type"].startswith("text/html")
    assert files["/playground.js"].headers["content-type"].startswith("text/javascript")
    assert 'src="playground.js"' in files["/playground"].text  # relative: works behind a path prefix
    assert models.status_code == (401 if key else 200)


def test_recorders_and_plain_requests_batched_together(ref):
    """Recording requests with different block geometry share a batch with a plain one: each log rebuilds its own
    whole canvas (ignore_eos) and the plain request's output is the offline one."""
    llm = ref
    qs = [q for q, _ in task.make_problems(3, seed=3, split="held_out")]
    prompts = [llm.model.apply_chat_template(task.messages_for(q)) for q in qs]
    params = [SamplingParams(max_tokens=12, steps=6, block_length=4, ignore_eos=True),
              SamplingParams(max_tokens=16, steps=16, block_length=8, ignore_eos=True),
              SamplingParams(max_tokens=20, block_length=8, cache="dual", threshold=0.8, ignore_eos=True,
                             temperature=0.5, seed=7)]
    expected = llm.generate(prompts, params)
    record = [True, False, True]

    async def main():
        async with AsyncEngine(llm) as eng:
            async def one(i):
                return [o async for o in eng.add_request(prompts[i], params[i], record_steps=record[i])][-1]
            return await asyncio.gather(*(one(i) for i in range(3)))

    outs = run(main())
    mask = llm.model.config.mask_id
    for out, exp, rec in zip(outs, expected, record):
        assert out.token_ids == exp.token_ids
        if rec:
            assert out.step_log.canvas(mask) == exp.token_ids and out.step_log.num_steps == exp.steps
            for s in out.step_log.since(0):
                assert all(s.block[0] <= p < s.block[1] for p in s.positions)
        else:
            assert out.step_log is None


def test_openai_client_reads_step_chunks(app, ref):
    """The official `openai` package parses step chunks (the step in the choice's extra fields, no content) and a
    plain stream from it carries none."""
    openai = pytest.importorskip("openai")
    (q, _), = task.make_problems(1, seed=31, split="held_out")

    async def main():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
        client = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        args = dict(model="tiny", messages=task.messages_for(q), stream=True, max_tokens=16)
        steps = [c async for c in await client.chat.completions.create(
            **args, stream_options={"include_steps": True})]
        plain = [c async for c in await client.chat.completions.create(**args)]
        await http.aclose()
        return steps, plain

    steps, plain = run(main())
    events = [c.choices[0].model_extra["diffusion_step"] for c in steps
              if c.choices and "diffusion_step" in (c.choices[0].model_extra or {})]
    assert [e["step"] for e in events] == list(range(1, len(events) + 1)) and events
    assert all(c.choices[0].delta.content is None for c in steps
               if c.choices and "diffusion_step" in (c.choices[0].model_extra or {}))
    exp = ref.chat(task.messages_for(q), SamplingParams(max_tokens=16))[0]
    text = "".join(c.choices[0].delta.content or "" for c in steps if c.choices)
    assert text == "".join(c.choices[0].delta.content or "" for c in plain if c.choices) == exp.text
    assert not any("diffusion_step" in (c.choices[0].model_extra or {}) for c in plain if c.choices)
    canvas = _replay(events, ref.model.config.mask_id)
    assert cut_at_stop_token(canvas, ref.model.config.stop_ids)[0] == exp.token_ids
