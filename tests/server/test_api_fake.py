"""Routes over a scripted engine (tests/server/fakes.py): auth, overload, failures after the stream started, a dead
engine, unexpected exceptions, body limits, CORS, disconnects of hanging requests."""
from __future__ import annotations

import asyncio

import pytest

from server.app import build_app
from server.config import ServerConfig

from .fakes import WORDS, FakeEngine
from .helpers import assert_error, call_and_leave, client, parse_sse, run

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def make(engine: FakeEngine | None = None, **config) -> tuple:
    engine = engine or FakeEngine()
    return build_app(engine, ServerConfig(served_model_names=["fake"], **config)), engine


def test_auth_on_requires_bearer_key_except_public_paths():
    app, _ = make(api_key="s3cret")

    async def main():
        async with client(app) as c:
            out = {"none": await c.post("/v1/chat/completions", json=CHAT),
                   "wrong": await c.post("/v1/chat/completions", json=CHAT,
                                         headers={"Authorization": "Bearer s3cre"}),
                   "basic": await c.post("/v1/chat/completions", json=CHAT,
                                         headers={"Authorization": "Basic s3cret"}),
                   "models": await c.get("/v1/models"), "unknown": await c.get("/nope"),
                   "completions": await c.post("/v1/completions", json={"prompt": "x"},
                                               headers={"Authorization": "Bearer "})}
            ok = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "bearer s3cret"})
            models = await c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
            public = [await c.get(p) for p in ("/health", "/metrics", "/version", "/openapi.json", "/docs")]
            return out, ok, models, public

    denied, ok, models, public = run(main())
    for name, r in denied.items():
        err = assert_error(r, 401)
        assert err["type"] == "AuthenticationError" and "s3cret" not in r.text, name
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "".join(WORDS)
    assert models.status_code == 200
    assert [r.status_code for r in public] == [200] * 5


def test_auth_off_by_default():
    app, _ = make()

    async def main():
        async with client(app) as c:
            return await c.post("/v1/chat/completions", json=CHAT)

    assert run(main()).status_code == 200


def test_queue_full_is_503_with_retry_after_and_recovers():
    app, engine = make(FakeEngine(hang=True, max_running=1), max_queue=2)

    async def main():
        async with client(app) as c:
            hanging = [asyncio.create_task(c.post("/v1/chat/completions", json=CHAT)) for _ in range(3)]
            while len(engine.live) < 3:
                await asyncio.sleep(0.01)
            full = await c.post("/v1/chat/completions", json=CHAT)
            too_many = await c.post("/v1/chat/completions", json={**CHAT, "n": 3})
            engine.hang = False
            for rid in list(engine.live):
                engine.abort(rid)
            aborted = await asyncio.gather(*hanging)
            after = await c.post("/v1/chat/completions", json=CHAT)
            return full, too_many, aborted, after

    full, too_many, aborted, after = run(main())
    assert_error(full, 503)
    assert full.headers["retry-after"] == "1"
    assert_error(too_many, 400, "n")  # 3 choices can never fit a queue of 2
    assert after.status_code == 200


def test_error_after_stream_started_is_an_error_event_then_done():
    app, engine = make(FakeEngine(block=2, fail_after=1))

    async def main():
        async with client(app) as c:
            return (await c.post("/v1/chat/completions", json={**CHAT, "stream": True}),
                    await c.post("/v1/chat/completions", json=CHAT))

    streamed, plain = run(main())
    events = parse_sse(streamed.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[1]["choices"][0]["delta"] == {"content": "alpha beta"}
    assert set(events[2]) == {"error"} and events[2]["error"]["code"] == 500
    assert events[3] == "[DONE]" and len(events) == 4
    err = assert_error(plain, 500)
    assert "engine failed" in err["message"]


def assert_unavailable(app) -> None:
    """/health and a new chat request both answer 503 (OpenAI-shaped)."""

    async def main():
        async with client(app) as c:
            return await c.get("/health"), await c.post("/v1/chat/completions", json=CHAT)

    health, req = run(main())
    assert health.status_code == 503
    assert_error(req, 503)


def test_dead_engine_health_503_and_requests_503():
    app, engine = make(FakeEngine(alive=False))
    assert_unavailable(app)


def test_unexpected_exception_is_a_shaped_500():
    class Broken(FakeEngine):
        def encode_chat(self, messages):
            raise KeyError("boom")

    app, _ = make(Broken())

    async def main():
        async with client(app) as c:
            return await c.post("/v1/chat/completions", json=CHAT)

    err = assert_error(run(main()), 500)
    assert err["type"] == "InternalServerError"


def test_body_limit_is_413():
    app, _ = make(max_body_bytes=200)

    async def main():
        async with client(app) as c:
            declared = await c.post("/v1/chat/completions",
                                    json={"messages": [{"role": "user", "content": "x" * 500}]})

            async def chunks():
                for _ in range(10):
                    yield b" " * 100
            streamed = await c.post("/v1/chat/completions", content=chunks(),
                                    headers={"content-type": "application/json"})
            small = await c.post("/v1/chat/completions", json=CHAT)
            return declared, streamed, small

    declared, streamed, small = run(main())
    assert_error(declared, 413)
    assert_error(streamed, 413)
    assert small.status_code == 200


def test_cors_only_when_configured():
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}

    async def main(app):
        async with client(app) as c:
            return (await c.options("/v1/chat/completions", headers=preflight),
                    await c.get("/v1/models", headers={"Origin": "http://ui.example"}))

    off_pre, off_get = run(main(make()[0]))
    assert "access-control-allow-origin" not in off_get.headers
    assert "access-control-allow-origin" not in off_pre.headers
    on_pre, on_get = run(main(make(allowed_origins=["http://ui.example"], api_key="k")[0]))
    assert on_pre.status_code == 200 and on_pre.headers["access-control-allow-origin"] == "http://ui.example"
    assert on_get.status_code == 401 and on_get.headers["access-control-allow-origin"] == "http://ui.example"


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_aborts_hanging_request(stream):
    app, engine = make(FakeEngine(hang=True, delay=0.01))
    sent = run(call_and_leave(app, "/v1/chat/completions", {**CHAT, "stream": stream, "n": 2}, 0.2))
    assert len(engine.added) == 2 and sorted(engine.aborted) == sorted(rid for _, _, rid in engine.added)
    assert not engine.live
    assert app.state.serving.inflight == 0
    if stream:
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200


def test_drain_refuses_new_requests():
    app, _ = make()
    app.state.serving.draining = True
    assert_unavailable(app)


def test_server_defaults_fill_unset_fields_and_requests_override_them():
    app, engine = make(sampling_defaults={"steps": 3, "cache": "dual", "block_length": 2})

    async def main():
        async with client(app) as c:
            await c.post("/v1/chat/completions", json=CHAT)
            await c.post("/v1/chat/completions", json={**CHAT, "steps": 5, "top_k": -1, "max_completion_tokens": 4,
                                                        "max_tokens": 9})

    run(main())
    (_, p1, _), (_, p2, _) = engine.added
    assert (p1.steps, p1.cache, p1.block_length, p1.max_tokens) == (3, "dual", 2, None)
    assert (p2.steps, p2.cache, p2.top_k, p2.max_tokens) == (5, "dual", 0, 4)


def test_message_without_content_is_empty_content():
    """Found by schemathesis: a message without `content` used to raise (500)."""
    app, engine = make()

    async def main():
        async with client(app) as c:
            return await c.post("/v1/chat/completions", json={"messages": [{"role": "tool"}, {"role": "user",
                                                                                              "content": None}]})

    assert run(main()).status_code == 200


def test_role_chunk_comes_with_the_first_block():
    """Load tools time TTFT to the first chunk with choices: nothing but the response head goes out before the
    first block is finished."""
    app, engine = make(FakeEngine(delay=1.0))
    sent = run(call_and_leave(app, "/v1/chat/completions", {**CHAT, "stream": True}, 0.3))
    bodies = [m.get("body", b"") for m in sent if m["type"] == "http.response.body"]
    assert sent[0]["type"] == "http.response.start" and not any(bodies)
    assert engine.aborted


@pytest.mark.parametrize("stream", [False, True])
def test_one_failing_choice_fails_the_request_and_releases_the_others(stream):
    app, engine = make(FakeEngine(block=1, delay=0.02, fail_after=1, fail_only="-1", hang=True))

    async def main():
        async with client(app) as c:
            r = await c.post("/v1/chat/completions", json={**CHAT, "n": 3, "stream": stream})
            await asyncio.sleep(0.1)
            return r

    r = run(main())
    if stream:
        events = parse_sse(r.text)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 500
    else:
        assert_error(r, 500)
    assert app.state.serving.inflight == 0 and not engine.live
    assert sorted(engine.aborted) == sorted(rid for _, _, rid in engine.added)


def test_api_docs_are_served_without_a_cdn():
    """FastAPI's default /docs loads Swagger UI from jsdelivr; ours serves the files itself (offline machines)."""
    import re

    from fastapi.testclient import TestClient
    from swagger_ui_bundle import swagger_ui_path
    app, _ = make(api_key="k")
    with TestClient(app) as c:
        html = c.get("/docs").text
        urls = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]|url: ?['"]([^'"]+)['"]""", html)
        urls = [a or b for a, b in urls]
        assert urls and all(u.startswith("/") for u in urls), urls  # no other origin
        for u in urls:
            r = c.get(u)  # public: no key needed for the page, its files or the schema
            assert r.status_code == 200, u
        js = c.get("/docs/swagger-ui-bundle.js").content
        assert js == (swagger_ui_path / "swagger-ui-bundle.js").read_bytes()
    with TestClient(make()[0]) as c:
        assert c.get("/redoc").status_code == 404  # ReDoc is CDN-only: not served


class _ThreadRecordingEngine(FakeEngine):
    """Records which thread applied each chat template."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def encode_chat(self, messages, tools=None):  # noqa: ANN001 - the EngineClient signature
        import threading
        self.threads.append(threading.current_thread().name)
        return super().encode_chat(messages)


def test_a_chat_with_tools_is_tokenized_off_the_event_loop():
    """A short message with a large tools list is rendered on the tokenizer thread (the template writes every
    tool's schema into the prompt), so it cannot stall the event loop that serves everyone else; a short
    message without tools stays inline."""
    engine = _ThreadRecordingEngine()
    app, _ = make(engine)
    tools = [{"type": "function", "function": {"name": f"f{i}", "description": "d" * 200,
                                               "parameters": {"type": "object"}}} for i in range(100)]

    async def main():
        async with client(app) as c:
            plain = await c.post("/v1/chat/completions", json=CHAT)
            with_tools = await c.post("/v1/chat/completions", json={**CHAT, "tools": tools})
            return plain, with_tools

    plain, with_tools = run(main())
    assert plain.status_code == 200 and with_tools.status_code == 200, with_tools.text
    assert not engine.threads[0].startswith("unmask-tokenize")
    assert engine.threads[1].startswith("unmask-tokenize"), engine.threads
