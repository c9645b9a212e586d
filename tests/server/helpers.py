"""Helpers for the server tests: running coroutines, parsing SSE, calling the ASGI app with a client that leaves."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx


def run(coro: Any, timeout: float = 120) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


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
