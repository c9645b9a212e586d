"""Connection limits (server/connection.py) against raw sockets: idle, slow-header, short-body and never-reading
clients are closed after their timeouts, connections beyond the cap get a 503, malformed HTTP a JSON 400.

The server is uvicorn with unmask's protocol, in a thread of this process, serving a small ASGI app (no model):
the limits live in the HTTP protocol, below the app."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import pytest
import uvicorn

from server.connection import ConnectionLimits, guarded_protocol

BIG = 64 << 20
"""Bytes the streaming route offers: far more than the kernel's socket buffers can absorb (a few MiB)."""


class App:
    """/stream sends BIG bytes in 64 KiB chunks, then records what receive() says (it blocks while the client is
    connected); /echo reads the body."""

    def __init__(self) -> None:
        self.stream_ended: str | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            chunk = b"x" * (64 << 10)
            for _ in range(BIG // len(chunk)):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self.stream_ended = (await receive())["type"]  # blocks unless the client is gone
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        body = b""
        while True:
            m = await receive()
            if m["type"] == "http.disconnect":
                return
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        out = json.dumps({"bytes": len(body)}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})


class Server:
    def __init__(self, limits: ConnectionLimits, keep_alive: float = 30.0) -> None:
        self.app = App()
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=0, lifespan="off", log_level="warning",
                             http=guarded_protocol(limits), timeout_keep_alive=keep_alive)
        self.server = uvicorn.Server(cfg)
        self.server.capture_signals = lambda: __import__("contextlib").nullcontext()  # type: ignore[assignment]
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < end, "uvicorn did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def connect(self, rcvbuf: int | None = None) -> socket.socket:
        s = socket.socket()
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(("127.0.0.1", self.port))
        return s

    def open_connections(self) -> int:
        return len(self.server.server_state.connections)


def read_all(s: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or `timeout` passes without a close (False)."""
    s.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data, True
            data += chunk
    except (socket.timeout, TimeoutError):
        return data, False
    except ConnectionResetError:
        return data, True


def recv_response(s: socket.socket, timeout: float = 10) -> bytes:
    """One response with a Content-Length body."""
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def json_error(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head.lower(), head
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, err
    return status, err


def closes_within(s: socket.socket, seconds: float) -> bytes:
    t0 = time.monotonic()
    data, closed = read_all(s, seconds)
    assert closed, f"still open after {time.monotonic() - t0:.1f} s"
    return data


def test_idle_connection_is_closed_after_the_header_timeout():
    with Server(ConnectionLimits(header_timeout=1.0)) as srv:
        s = srv.connect()
        assert closes_within(s, 10) == b""  # nothing was asked: closed without a response


def test_partial_headers_get_408_json_and_close():
    with Server(ConnectionLimits(header_timeout=1.0)) as srv:
        s = srv.connect()
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Le")  # slowloris: never finishes the headers
        status, err = json_error(closes_within(s, 10))
        assert status == 408 and "headers" in err["message"]


def test_trickled_headers_do_not_reset_the_header_timeout():
    with Server(ConnectionLimits(header_timeout=1.5)) as srv:
        s = srv.connect()
        s.settimeout(0.05)
        t0, closed = time.monotonic(), False
        while time.monotonic() - t0 < 10 and not closed:
            try:
                s.sendall(b"X-A: b\r\n" if time.monotonic() - t0 > 0.01 else b"GET /echo HTTP/1.1\r\n")
                closed = s.recv(65536) == b""
            except (socket.timeout, TimeoutError):
                pass
            except OSError:
                closed = True
            time.sleep(0.2)
        assert closed and time.monotonic() - t0 < 8


def test_content_length_lie_gets_408_and_close():
    with Server(ConnectionLimits(body_timeout=1.0)) as srv:
        s = srv.connect()
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                  b'{"a": 1')
        status, err = json_error(closes_within(s, 10))
        assert status == 408 and "Content-Length" in err["message"]


def test_a_complete_slow_body_and_keep_alive_still_work():
    with Server(ConnectionLimits(header_timeout=1.0, body_timeout=1.0)) as srv:
        s = srv.connect()
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
        time.sleep(0.5)  # under the body timeout between reads
        s.sendall(b"def")
        first = recv_response(s)
        assert first.startswith(b"HTTP/1.1 200") and first.endswith(b'{"bytes": 6}')
        time.sleep(1.5)  # idle keep-alive, longer than the header timeout: still open (keep-alive rules)
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_response(s).startswith(b"HTTP/1.1 200")


def test_malformed_http_gets_a_json_400():
    with Server(ConnectionLimits()) as srv:
        s = srv.connect()
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        status, err = json_error(closes_within(s, 10))
        assert status == 400 and "malformed" in err["message"]


def test_connections_over_the_cap_get_503_and_the_cap_frees():
    with Server(ConnectionLimits(max_connections=3, header_timeout=30)) as srv:
        held = [srv.connect() for _ in range(3)]
        time.sleep(0.2)
        extra = srv.connect()
        status, err = json_error(closes_within(extra, 10))
        assert status == 503 and "connections" in err["message"]
        for s in held:
            s.close()
        end = time.monotonic() + 10
        while srv.open_connections() and time.monotonic() < end:
            time.sleep(0.05)
        s = srv.connect()
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_client_that_never_reads_is_disconnected_after_the_send_timeout():
    with Server(ConnectionLimits(send_timeout=1.0)) as srv:
        s = srv.connect(rcvbuf=4096)
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(4.0)  # never reads: the kernel buffers fill, then the server's writes wait, then time out
        end = time.monotonic() + 20
        while srv.open_connections() and time.monotonic() < end:
            time.sleep(0.05)
        assert srv.open_connections() == 0
        assert srv.app.stream_ended == "http.disconnect"  # the app is told the client is gone
        data, closed = read_all(s, 10)
        assert closed and len(data) < BIG


@pytest.mark.parametrize("limit", ["header_timeout", "body_timeout", "send_timeout"])
def test_limits_validate(limit):
    with pytest.raises(ValueError, match=limit):
        ConnectionLimits(**{limit: 0})
