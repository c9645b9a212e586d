"""`unmask serve` (server.cli) whose accepted connections get a 4 KiB socket send buffer, for tests of clients that
stop reading: on loopback the kernel otherwise absorbs megabytes of a response before the server's writes wait, more
than a small model's stream produces in a test's time. Only the buffer size differs from the product.

    python -m tests.server.small_sndbuf_serve serve --port 0 ...
"""
from __future__ import annotations

import socket
import sys
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

SNDBUF = 4096
_connection_made = H11Protocol.connection_made


def connection_made(self: H11Protocol, transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    _connection_made(self, transport)


H11Protocol.connection_made = connection_made  # type: ignore[method-assign]

if __name__ == "__main__":
    from server.cli import main
    sys.exit(main())
