"""GuardedH11Protocol: uvicorn's HTTP/1.1 protocol with the connection limits a server facing careless or hostile
clients needs (uvicorn has only a keep-alive timeout, armed after a first response).

    uvicorn.Config(app, http=guarded_protocol(ConnectionLimits(header_timeout=10)), ...)

- header_timeout: a request's headers must arrive complete within this many seconds of the connection opening (or
  of the first byte after a keep-alive pause); else 408 and close. A connection that never sends a byte is closed
  silently after it too (slowloris, idle sockets).
- body_timeout: a request body must keep arriving: at most this many seconds between two reads (a Content-Length
  larger than what is sent, a stalled upload); else 408 and close.
- send_timeout: a response whose client stopped reading (the socket's send buffer full) for this long is abandoned
  and the connection closed, like nginx's send_timeout; the app sees a disconnect (a stream is aborted in the
  engine, its slots and memory freed).
- max_connections: open connections at most; one over it is answered 503 and closed at once.
- A malformed request gets an OpenAI-shaped JSON 400 (uvicorn's is plain text).
Errors written here bypass h11 (it refuses to answer a request it has not parsed) and always close the connection.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import APIError

log = logging.getLogger("unmask.server")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    send_timeout: float = 60.0
    max_connections: int = 1024

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "send_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")


def error_bytes(status: int, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response with an OpenAI-shaped JSON error body and Connection: close."""
    err = APIError(status, message)
    body = json.dumps(err.body()).encode()
    phrase = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}.get(status, "Error")
    lines = [f"HTTP/1.1 {status} {phrase}", "content-type: application/json", f"content-length: {len(body)}",
             "connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    limits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None

    # connection ---------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("refusing a connection: %d open (--max-connections %d)", len(self.connections) - 1,
                        self.limits.max_connections)
            self._fail(503, f"too many open connections (the server allows {self.limits.max_connections})",
                       {"retry-after": "1"})
            return
        self._arm_read(self.limits.header_timeout, self._header_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read()
        self._cancel_send()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None and self._between_requests():
            self._arm_read(self.limits.header_timeout, self._header_timed_out)  # a new request begins
        super().data_received(data)

    def _between_requests(self) -> bool:
        """No request is being received or answered (its headers may be arriving)."""
        return self.cycle is None or self.cycle.response_complete

    def handle_events(self) -> None:
        super().handle_events()
        if self.transport.is_closing() or self._between_requests():
            return  # no request yet: the header timer (if armed) keeps running
        if self.cycle.more_body:  # headers in, body not complete: it must keep coming (re-armed at every read)
            self._arm_read(self.limits.body_timeout, self._body_timed_out)
        else:  # the whole request is in: the app takes its time
            self._cancel_read()

    def on_response_complete(self) -> None:
        self._cancel_read()
        super().on_response_complete()  # arms uvicorn's keep-alive timeout; a pipelined request starts here

    # timers -------------------------------------------------------------------------------------------------
    def _arm_read(self, seconds: float, handler: Any) -> None:
        self._cancel_read()
        self._read_timer = self.loop.call_later(seconds, handler)

    def _cancel_read(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _cancel_send(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _header_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing() or not self._between_requests():
            return
        if self.conn.trailing_data[0]:  # part of a request's headers
            log.info("closing a connection: request headers incomplete after %g s", self.limits.header_timeout)
            self._fail(408, f"the request headers did not arrive within {self.limits.header_timeout:g} s")
        else:  # an idle connection that never started a request
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        started = self.cycle is not None and self.cycle.response_started
        log.info("closing a connection: no request body bytes for %g s", self.limits.body_timeout)
        if started:
            self._close_cycle()
            self.transport.abort()
        else:
            self._fail(408, f"the request body stopped arriving (nothing for {self.limits.body_timeout:g} s; "
                            "is Content-Length larger than the body?)")

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.limits.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        self._cancel_send()
        super().resume_writing()

    def _send_timed_out(self) -> None:
        self._send_timer = None
        if self.transport.is_closing():
            return
        log.info("closing a connection: its client read nothing for %g s (--send-timeout)", self.limits.send_timeout)
        self.abandon()

    def abandon(self) -> None:
        """Close the connection now, whatever its state; the app sees a disconnect."""
        self._close_cycle()
        self.transport.abort()

    def _close_cycle(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.flow.resume_writing()

    # errors -------------------------------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        self._fail(400, f"malformed HTTP request ({msg.rstrip('.')})")

    def _fail(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._cancel_read()
        self._close_cycle()
        self.transport.write(error_bytes(status, message, headers))
        self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol class bound to these limits (uvicorn instantiates the class per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
