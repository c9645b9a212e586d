"""The server at its real defaults (dtype auto, the bundled model) against careless and hostile clients: a stream
nobody reads, a slow reader, a request that would hog the batch, lone surrogates, seeds with n, request ids,
HEAD /health, CORS refusals, over-long prompts. In-process (ASGI) over the real engine."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

import server.serving as serving_mod
from engine.bundled import DEFAULT_MODEL_DIR
from server.app import build_app
from server.config import ServerConfig

from .helpers import assert_error, client, local_engine, parse_sse, run, wait_until

MAX_NUM_SEQS = 8


@pytest.fixture(scope="module")
def engine():
    with local_engine(DEFAULT_MODEL_DIR, dtype="auto", max_num_seqs=MAX_NUM_SEQS, kv_cache_memory=1 << 24) as eng:
        yield eng


@pytest.fixture(scope="module")
def app(engine):
    return build_app(engine, ServerConfig(served_model_names=["tiny"]))


def _scope(path: str) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
            "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}


class StalledClient:
    """An ASGI client that sends a request, takes the response headers and then never reads again: its `send`
    blocks (as uvicorn's does once the socket's buffers are full) until `leave()`."""

    def __init__(self, app: Any, path: str, body: dict[str, Any], read_chunks: int = 1) -> None:
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.inbox.put_nowait({"type": "http.request", "body": json.dumps(body).encode(), "more_body": False})
        self.read_chunks, self.chunks = read_chunks, 0
        self.sent: list[dict[str, Any]] = []
        self._gone = asyncio.Event()
        self.task = asyncio.create_task(app(_scope(path), self.inbox.get, self.send))

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body":
            self.chunks += 1
            if self.chunks > self.read_chunks:
                await self._gone.wait()  # the client reads nothing more

    async def leave(self) -> None:
        self._gone.set()
        await self.inbox.put({"type": "http.disconnect"})
        await asyncio.wait_for(self.task, 60)


# --- item 2: finished work of a never-read stream does not count against --max-queue -------------------------------
def test_a_never_read_stream_does_not_lock_others_out(engine):
    app = build_app(engine, ServerConfig(served_model_names=["tiny"], max_queue=8))
    serving = app.state.serving

    async def main():
        hog = StalledClient(app, "/v1/completions", {"prompt": "sort 3 1 2", "n": 8, "max_tokens": 8, "steps": 8,
                                                     "stream": True, "ignore_eos": True})
        try:
            # the engine finishes the 8 choices although nobody reads their stream
            await wait_until(lambda: serving.inflight == 0)
            assert not hog.task.done()  # the stream itself is still stuck on its client
            async with client(app) as c:
                r = await c.post("/v1/completions", json={"prompt": "sort 2 1", "max_tokens": 4, "n": 2})
            assert r.status_code == 200, r.text
        finally:
            await hog.leave()
        assert serving.inflight == 0 and engine.stats().running == 0

    run(main())


# --- item 3: a slow reader holds one output per choice, not a queue ------------------------------------------------
def test_a_slow_reader_holds_at_most_one_output_per_choice(app, monkeypatch):
    runners: list[Any] = []
    real = serving_mod.ChoiceRunner

    def recording(*a: Any, **k: Any) -> Any:
        runners.append(real(*a, **k))
        return runners[-1]

    monkeypatch.setattr(serving_mod, "ChoiceRunner", recording)

    async def main():
        slow = StalledClient(app, "/v1/completions", {
            "prompt": "sort 5 3 1 2", "n": 4, "max_tokens": 32, "steps": 32, "block_length": 4, "stream": True,
            "ignore_eos": True, "stream_options": {"include_steps": True}})
        await wait_until(lambda: bool(runners) and all(c.done for c in runners[0].choices))
        runner = runners[0]
        assert len(runner.pending) <= 4 and runner.max_pending <= 4
        slow._gone.set()  # now read everything: every step is still delivered, from the step logs
        await asyncio.wait_for(slow.task, 60)
        body = b"".join(m.get("body", b"") for m in slow.sent if m["type"] == "http.response.body")
        events = [e for e in parse_sse(body.decode()) if e != "[DONE]"]
        steps = {}
        for e in events:
            for ch in e["choices"]:
                if "diffusion_step" in ch:
                    steps.setdefault(ch["index"], []).append(ch["diffusion_step"]["step"])
        assert steps == {i: list(range(1, 33)) for i in range(4)}
        finals = [ch for e in events for ch in e["choices"] if ch["finish_reason"]]
        assert sorted(ch["index"] for ch in finals) == [0, 1, 2, 3]

    run(main())


# --- item 4: fairness ----------------------------------------------------------------------------------------------
def test_total_work_per_request_is_bounded(app):
    async def main():
        async with client(app) as c:
            return await c.post("/v1/completions", json={"prompt": "sort 1 2", "n": 128, "max_tokens": 1,
                                                         "steps": 16384, "ignore_eos": True})

    err = assert_error(run(main()), 400, "steps")
    assert "128 choices x 16384 steps" in err["message"] and "--max-request-steps" in err["message"]


def test_the_work_bound_counts_the_resolved_plan(engine):
    """steps below the number of blocks still take one step per block (the resolved plan): n x steps must count
    those, not the `steps` sent (3 choices x steps 1 passed a bound of 16 while each ran 8 steps)."""
    from server.limits import RequestLimits
    app = build_app(engine, ServerConfig(served_model_names=["tiny"], limits=RequestLimits(max_request_steps=16)))
    body = {"prompt": "sort 1 2", "max_tokens": 8, "block_length": 1, "steps": 1}

    async def main():
        async with client(app) as c:
            return (await c.post("/v1/completions", json={**body, "n": 3}),
                    await c.post("/v1/completions", json={**body, "n": 2}))

    refused, served = run(main())
    assert "3 choices x 8 steps = 24" in assert_error(refused, 400, "steps")["message"]
    assert served.status_code == 200 and served.json()["diffusion"]["steps"] == 16


def test_a_many_choice_request_leaves_slots_for_a_short_one(engine):
    app = build_app(engine, ServerConfig(served_model_names=["tiny"]))
    serving = app.state.serving
    assert serving.max_live == MAX_NUM_SEQS // 2

    async def main():
        hog = StalledClient(app, "/v1/completions", {"prompt": "sort 1 2", "n": 16, "max_tokens": 1, "steps": 2048,
                                                     "ignore_eos": True, "stream": True}, read_chunks=10 ** 9)
        try:
            await wait_until(lambda: engine.stats().running == MAX_NUM_SEQS // 2)
            start = engine.stats().steps
            async with client(app) as c:
                r = await c.post("/v1/completions", json={"prompt": "sort 3 1 2", "max_tokens": 8, "steps": 8})
            assert r.status_code == 200, r.text
            taken = engine.stats().steps - start
            # served alongside the hog: within a few engine steps of its own 8, not after the hog's 2048
            assert taken < 512, taken  # (engine steps also run while the HTTP layer handles the request)
            assert not hog.task.done() and engine.stats().running >= 1
        finally:
            await hog.leave()
        await wait_until(lambda: engine.stats().running == 0 and serving.inflight == 0)

    run(main())


# --- item 8: lone surrogates and tokenizer rejections --------------------------------------------------------------
SURROGATE_BODIES = [
    ("/v1/chat/completions", '{"model": "ti\\ud800ny", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/v1/completions", '{"prompt": "sort \\udc80 1"}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "x\\ud83d"]}', "prompt[1]"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\udfffb"}]}', "messages[0].content"),
    ("/v1/completions", '{"prompt": "sort 1 2", "stop": ["\\ud800"]}', "stop[0]"),
]


@pytest.mark.parametrize("path,raw,param", SURROGATE_BODIES)
def test_lone_surrogates_get_a_400_naming_the_field(app, caplog, path, raw, param):
    async def main():
        async with client(app) as c:
            return await c.post(path, content=raw.encode(), headers={"content-type": "application/json"})

    with caplog.at_level(logging.INFO):
        r = run(main())
    err = assert_error(r, 400, param)
    assert "surrogate" in err["message"]
    r.content.decode("utf-8")  # the body is valid UTF-8 (nothing echoed raw)
    assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged"


def test_the_tokenizers_own_errors_are_a_clean_400(engine, app, monkeypatch):
    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("internal tokenizer state")  # what a tokenizer library may raise on odd input

    monkeypatch.setattr(engine, "encode", broken)

    async def main():
        async with client(app) as c:
            return await c.post("/v1/completions", json={"prompt": "sort 1 2"})

    err = assert_error(run(main()), 400, "prompt")
    assert "internal tokenizer state" not in err["message"] and "tokenizer" in err["message"]


# --- item 9: seeds with n ------------------------------------------------------------------------------------------
def _reference_seed(seed: int, i: int) -> int:
    """The documented definition: seed + i modulo 2**64, as a signed 64-bit integer."""
    v = (seed + i) % 2 ** 64
    return v - 2 ** 64 if v >= 2 ** 63 else v


@pytest.mark.parametrize("seed", [-1, -(2 ** 63), 2 ** 63 - 2, 12345])
def test_choice_i_uses_seed_plus_i_modulo_2_64(app, seed):
    opts = {"prompt": "sort 4 2 9 1", "max_tokens": 8, "steps": 8, "temperature": 1.0, "ignore_eos": True}

    async def main():
        async with client(app) as c:
            many = await c.post("/v1/completions", json={**opts, "n": 3, "seed": seed})
            alone = [await c.post("/v1/completions", json={**opts, "seed": _reference_seed(seed, i)})
                     for i in range(3)]
            return many, alone

    many, alone = run(main())
    assert many.status_code == 200, many.text
    texts = [ch["token_ids"] if ch["text"] is None else ch["text"] for ch in many.json()["choices"]]
    assert texts == [a.json()["choices"][0]["text"] for a in alone]


# --- item 13: small ones -------------------------------------------------------------------------------------------
def test_head_health_and_request_ids(app):
    async def main():
        async with client(app) as c:
            return (await c.head("/health"), await c.get("/health", headers={"X-Request-Id": "abc-123"}),
                    await c.post("/v1/completions", json={"prompt": "x", "n": 0}),
                    await c.get("/health"), await c.get("/health", headers={"X-Request-Id": "bad id\x7f"}))

    head, echoed, bad, fresh, invalid = run(main())
    assert head.status_code == 200 and head.content == b""
    assert echoed.headers["x-request-id"] == "abc-123"
    assert bad.status_code == 400 and len(bad.headers["x-request-id"]) >= 16  # errors carry one too
    assert fresh.headers["x-request-id"] != bad.headers["x-request-id"]
    assert invalid.headers["x-request-id"] != "bad id\x7f" and invalid.headers["x-request-id"].isalnum()


def test_a_refused_cors_preflight_gets_a_json_error(engine):
    app = build_app(engine, ServerConfig(served_model_names=["tiny"], allowed_origins=["http://ui.example"]))

    async def main():
        async with client(app) as c:
            return await c.options("/v1/chat/completions", headers={
                "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})

    err = assert_error(run(main()), 400)
    assert "CORS" in err["message"]


def test_an_over_long_prompt_names_the_right_numbers(app, engine):
    ctx = engine.info.max_model_len

    async def main():
        async with client(app) as c:
            return (await c.post("/v1/completions", json={"prompt": "1 " * (ctx + 8), "max_tokens": 4}),
                    await c.post("/v1/completions", json={"prompt": [5] * (ctx - 2), "max_tokens": 4}))

    too_long, with_tokens = run(main())
    err = assert_error(too_long, 400, "prompt")
    assert "max_tokens 0" not in err["message"] and "+ max_tokens" not in err["message"]
    err = assert_error(with_tokens, 400, "max_tokens")
    assert "(4)" in err["message"] and f"({ctx - 2} tokens)" in err["message"]
