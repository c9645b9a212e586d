"""Helpers for the server tests: running coroutines, a served engine, parsing SSE, calling the ASGI app with a client
that leaves."""
from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import httpx


def run(coro: Any, timeout: float = 120) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.contextmanager
def local_engine(model: str | Path, **options: Any) -> Iterator[Any]:
    """A LocalEngineClient serving `model` (LLM options; page_size 4 unless given), shut down on exit: the
    module-scoped engine fixtures of the server tests."""
    from server.engine_client import LocalEngineClient
    eng = LocalEngineClient.from_model(model, **{"page_size": 4, **options})
    try:
        yield eng
    finally:
        run(eng.shutdown())


async def wait_until(cond: Any, timeout: float = 120, poll: float = 0.005) -> None:
    """Poll cond() on the event loop until it holds; fail the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(poll)


def client(app: Any, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://testserver", headers=headers, timeout=60)


def parse_sse(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body in order: parsed JSON, or the string '[DONE]'."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(resp: httpx.Response, status: int, param: str | None = "__any__") -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"], err
    if param != "__any__":
        assert err["param"] == param, err
    return err


async def call_and_leave(app: Any, path: str, body: dict[str, Any], leave_after: float) -> list[dict[str, Any]]:
    """POST body to the ASGI app, then send http.disconnect after leave_after seconds (as a client that closes its
    connection). Returns the ASGI messages the app sent."""
    inbox: asyncio.Queue = asyncio.Queue()
    await inbox.put({"type": "http.request", "body": json.dumps(body).encode(), "more_body": False})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    task = asyncio.create_task(app(scope, inbox.get, send))
    await asyncio.sleep(leave_after)
    await inbox.put({"type": "http.disconnect"})
    await asyncio.wait_for(task, 30)
    return sent


def assert_block_deltas(deltas: list[str], texts: list[str], at_least: int = 2) -> None:
    """A stream's content deltas come per finished block: each delta ends where a block ends (`texts`: the answer's
    text at each block's end, in order) and together they are the whole answer. A consumer slower than the engine
    may get two or more finished blocks merged into one delta (the stream keeps only the latest output), never a
    part of one."""
    assert all(b.startswith(a) for a, b in zip(["", *texts], texts))
    ends, acc = set(texts), ""
    for d in deltas:
        acc += d
        assert acc in ends, f"a delta ends mid-block: {acc!r} is no block end of {texts!r}"
    assert acc == texts[-1] and len(deltas) >= at_least, (deltas, texts)
