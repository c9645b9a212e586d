"""unmask_client without a model: retries, Retry-After, typed errors, SSE parsing, request bodies, readiness.

The server side is httpx.MockTransport (scripted answers, every request recorded) or, for readiness, a real
http.server on 127.0.0.1 that starts late. Waits are recorded instead of slept.
"""
from __future__ import annotations

import asyncio
import email.utils
import http.server
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from unmask_client import (APIConnectionError, APITimeoutError, AsyncClient, BadRequestError, Client,
                           NotFoundError, RateLimitError, ReadyTimeoutError, RetryPolicy, ServiceUnavailableError,
                           StreamError)
from unmask_client.retry import parse_retry_after

CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "1 2 3"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
        "diffusion": {"steps": 4, "forward_passes": 4, "tokens_committed": 4, "tokens_per_forward": 1.0}}
MSG = [{"role": "user", "content": "sort 3 2 1"}]


def error_body(message: str, param: str | None, code: int) -> dict:
    return {"error": {"message": message, "type": "BadRequestError", "param": param, "code": code}}


def sse(*events: dict | str) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def chunk(text: str | None = None, role: str | None = None, finish: str | None = None) -> dict:
    delta = {k: v for k, v in (("role", role), ("content", text)) if v is not None}
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


class Script:
    """A MockTransport handler answering from a list (the last answer repeats) and recording requests."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer() if callable(answer) else answer

    def bodies(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests]


def make_client(script: Script, **kw) -> tuple[Client, list[float]]:
    c = Client("http://test/v1", model="m", transport=httpx.MockTransport(script), **kw)
    waits: list[float] = []
    c._sleep = waits.append
    return c, waits


def test_503_retry_after_is_honoured_then_succeeds():
    script = Script(httpx.Response(503, headers={"Retry-After": "2"}, json=error_body("queue full", None, 503)),
                    httpx.Response(200, json=CHAT))
    c, waits = make_client(script)
    r = c.chat(MSG, max_tokens=8)
    assert waits == [2.0] and len(script.requests) == 2
    assert r.text == "1 2 3" and r.usage.total_tokens == 9 and r.diffusion.tokens_per_forward == 1.0
    assert script.bodies()[0] == script.bodies()[1]  # the same request sent again


def test_retry_after_is_capped_and_backoff_grows_within_jitter():
    script = Script(httpx.Response(429, headers={"Retry-After": "100"}), httpx.Response(429), httpx.Response(429),
                    httpx.Response(200, json=CHAT))
    policy = RetryPolicy(max_retries=3, initial_delay=0.5, max_delay=8.0, jitter=0.25)
    c, waits = make_client(script, retry=policy)
    c.chat(MSG)
    assert waits[0] == 8.0  # Retry-After 100 capped at max_delay
    assert 0.75 <= waits[1] <= 1.0 and 1.5 <= waits[2] <= 2.0  # 0.5 * 2**attempt, jitter down to 75%
    assert len(script.requests) == 4


def test_retries_exhausted_raise_typed_error_with_server_fields():
    script = Script(httpx.Response(503, headers={"Retry-After": "1"},
                                   json={"error": {"message": "waiting queue is full (1000)", "type": "ServiceUnavailable",
                                                   "param": None, "code": 503}}))
    c, waits = make_client(script, max_retries=2)
    with pytest.raises(ServiceUnavailableError) as e:
        c.chat(MSG)
    assert len(script.requests) == 3 and waits == [1.0, 1.0]
    err = e.value
    assert err.status == 503 and err.message == "waiting queue is full (1000)" and err.retry_after == 1.0
    assert err.type == "ServiceUnavailable" and err.code == 503


@pytest.mark.parametrize("status,cls", [(400, BadRequestError), (404, NotFoundError)])
def test_4xx_are_not_retried_and_carry_param(status, cls):
    script = Script(httpx.Response(status, json=error_body("steps must be >= 1, got 0", "steps", status)))
    c, waits = make_client(script)
    with pytest.raises(cls) as e:
        c.chat(MSG, steps=0)
    assert len(script.requests) == 1 and waits == []
    assert e.value.status == status and e.value.param == "steps" and "steps must be" in e.value.message


def test_429_error_when_out_of_retries_is_rate_limit_error():
    script = Script(httpx.Response(429, text="slow down"))
    c, _ = make_client(script, max_retries=0)
    with pytest.raises(RateLimitError) as e:
        c.complete("x")
    assert e.value.message == "slow down" and len(script.requests) == 1


def test_connection_errors_are_retried_read_timeouts_are_not():
    script = Script(httpx.ConnectError("refused"), httpx.RemoteProtocolError("reset"), httpx.Response(200, json=CHAT))
    c, waits = make_client(script)
    assert c.chat(MSG).text == "1 2 3" and len(waits) == 2 and len(script.requests) == 3
    script = Script(httpx.ReadTimeout("slow"), httpx.Response(200, json=CHAT))
    c, waits = make_client(script)
    with pytest.raises(APITimeoutError):
        c.chat(MSG)
    assert len(script.requests) == 1 and waits == []
    script = Script(httpx.ConnectError("refused"))
    c, waits = make_client(script, max_retries=1)
    with pytest.raises(APIConnectionError, match="refused"):
        c.chat(MSG)
    assert len(script.requests) == 2


def test_body_has_typed_options_and_drops_unset_ones():
    script = Script(httpx.Response(200, json=CHAT))
    c, _ = make_client(script, api_key="sk-1")
    c.chat(MSG, max_tokens=16, steps=8, block_length=4, remasking="low_confidence", threshold=0.9, cache="dual",
           top_k=3, ignore_eos=True, cfg_scale=0.0, algorithm="llada", alg_temp=0.5, factor=1.0, seed=7,
           temperature=0, stop=["\n"], n=2, extra_body={"vllm_xargs": {"a": 1}})
    body = script.bodies()[0]
    assert body == {"model": "m", "messages": MSG, "max_tokens": 16, "steps": 8, "block_length": 4,
                    "remasking": "low_confidence", "threshold": 0.9, "cache": "dual", "top_k": 3, "ignore_eos": True,
                    "cfg_scale": 0.0, "algorithm": "llada", "alg_temp": 0.5, "factor": 1.0, "seed": 7,
                    "temperature": 0, "stop": ["\n"], "n": 2, "vllm_xargs": {"a": 1}}
    req = script.requests[0]
    assert req.url == "http://test/v1/chat/completions" and req.headers["authorization"] == "Bearer sk-1"
    with pytest.raises(ValueError, match="include_usage"):
        c.chat(MSG, include_usage=True)


def test_model_defaults_to_the_first_served_one():
    models = {"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": "unmask",
                                          "root": "/m", "max_model_len": 512, "family": "llada"}]}
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(200, json=models if request.url.path == "/v1/models" else CHAT)

    c = Client("http://test", transport=httpx.MockTransport(handler))
    c.complete([1, 2, 3])
    c.complete([1, 2, 3])
    assert calls == ["/v1/models", "/v1/completions", "/v1/completions"]
    assert c.models()[0].family == "llada"


def test_stream_yields_block_deltas_usage_and_stops_at_done():
    usage = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
             "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}}
    body = sse(chunk("", role="assistant"), chunk("1 2"), chunk(" 3"), chunk(finish="stop"), usage, "[DONE]")
    script = Script(httpx.Response(503), httpx.Response(200, content=body,
                                                        headers={"content-type": "text/event-stream"}))
    c, waits = make_client(script)
    chunks = list(c.chat(MSG, stream=True, block_length=2))
    assert len(waits) == 1  # a 503 before the stream starts is retried
    assert script.bodies()[1]["stream"] is True and script.bodies()[1]["stream_options"] == {"include_usage": True}
    assert [ch.text for ch in chunks] == ["", "1 2", " 3", "", ""]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[3].choices[0].finish_reason == "stop"
    assert chunks[4].choices == [] and chunks[4].usage.completion_tokens == 6


class BreakingStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """Two events, then the connection drops."""
    data = sse(chunk("", role="assistant"), chunk("1 2"))

    def __iter__(self):
        yield self.data
        raise httpx.ReadError("connection reset")

    async def __aiter__(self):
        yield self.data
        raise httpx.ReadError("connection reset")


def test_stream_broken_midway_raises_and_is_never_resent():
    script = Script(lambda: httpx.Response(200, stream=BreakingStream()))
    c, waits = make_client(script)
    got = []
    with pytest.raises(APIConnectionError, match="interrupted"):
        for ch in c.chat(MSG, stream=True):
            got.append(ch.text)
    assert got == ["", "1 2"] and len(script.requests) == 1 and waits == []


def test_stream_without_done_is_an_error():
    script = Script(httpx.Response(200, content=sse(chunk("1"))))
    c, _ = make_client(script)
    with pytest.raises(APIConnectionError, match="without"):
        list(c.chat(MSG, stream=True))


def test_error_event_in_stream_raises_stream_error():
    body = sse(chunk("", role="assistant"), error_body("engine step failed", None, 500), "[DONE]")
    c, _ = make_client(Script(httpx.Response(200, content=body)))
    stream = c.chat(MSG, stream=True)
    assert next(stream).choices[0].delta.role == "assistant"
    with pytest.raises(StreamError) as e:
        next(stream)
    assert e.value.message == "engine step failed" and e.value.status == 500


def test_sse_multiline_and_comments():
    body = b": keep-alive\n\nevent: message\ndata: {\"id\": \"c\", \"choices\": [{\"index\": 0,\ndata:  \"delta\": {\"content\": \"x\"}}]}\n\ndata: [DONE]\n\n"
    c, _ = make_client(Script(httpx.Response(200, content=body)))
    assert [ch.text for ch in c.chat(MSG, stream=True)] == ["x"]


def test_retry_after_http_date_and_ms():
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after(httpx.Response(503, headers={"Retry-After": date}), now=now) <= 31
    assert parse_retry_after(httpx.Response(503, headers={"retry-after-ms": "250"})) == 0.25
    assert parse_retry_after(httpx.Response(503, headers={"Retry-After": "soon"})) is None
    assert parse_retry_after(httpx.Response(503)) is None


def test_async_client_retries_and_streams():
    async def main():
        script = Script(httpx.Response(503, headers={"Retry-After": "0.5"}), httpx.Response(200, json=CHAT))
        c = AsyncClient("http://test", model="m", transport=httpx.MockTransport(script))
        waits = []

        async def sleep(s):
            waits.append(s)
        c._sleep = sleep
        r = await c.chat(MSG, steps=4)
        assert r.text == "1 2 3" and waits == [0.5] and script.bodies()[1]["steps"] == 4

        ok = sse(chunk("", role="assistant"), chunk("1"), chunk(" 2", finish="stop"), "[DONE]")
        c2 = AsyncClient("http://test", model="m", transport=httpx.MockTransport(Script(httpx.Response(200, content=ok))))
        assert [ch.text async for ch in await c2.chat(MSG, stream=True)] == ["", "1", " 2"]

        broken = Script(lambda: httpx.Response(200, stream=BreakingStream()))
        c3 = AsyncClient("http://test", model="m", transport=httpx.MockTransport(broken))
        got = []
        with pytest.raises(APIConnectionError):
            async for ch in await c3.chat(MSG, stream=True):
                got.append(ch.text)
        assert got == ["", "1 2"] and len(broken.requests) == 1
        for x in (c, c2, c3):
            await x.close()

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wait_until_ready_against_a_server_that_starts_late():
    """Connection refused, then 503 (loading), then 200: wait_until_ready returns once /health is 200."""
    port, hits = _free_port(), []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200 if len(hits) >= 3 else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    servers = []

    def start() -> None:  # bind only now: until then connections are refused
        servers.append(http.server.ThreadingHTTPServer(("127.0.0.1", port), Health))
        servers[0].serve_forever()

    starter = threading.Timer(0.3, start)
    c = Client(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(APIConnectionError):
            c.health()  # nothing listens yet
        starter.start()
        c.wait_until_ready(timeout=30, interval=0.05)
        assert hits == ["/health"] * 3  # polled through the refusals and both 503s, stopped at the 200
        assert c.health() is True
    finally:
        starter.cancel()
        for server in servers:
            server.shutdown()
            server.server_close()
        starter.join()


def test_wait_until_ready_times_out_with_the_reason():
    c = Client(f"http://127.0.0.1:{_free_port()}", connect_timeout=0.5)
    with pytest.raises(ReadyTimeoutError, match="not ready after 0.3s"):
        c.wait_until_ready(timeout=0.3, interval=0.05)


def test_package_needs_only_httpx_and_pydantic():
    root = Path(__file__).resolve().parents[1] / "clients" / "python"
    deps = re.search(r"dependencies = \[(.*?)\]", (root / "pyproject.toml").read_text(), re.S).group(1)
    assert sorted(re.findall(r'"([A-Za-z0-9_.-]+)', deps)) == ["httpx", "pydantic"]
    code = "import sys, unmask_client; bad = [m for m in ('torch', 'engine', 'server', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"
