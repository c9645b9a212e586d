"""SSEResponse: a `text/event-stream` response that notices a client disconnect at once.

Starlette's StreamingResponse only notices a disconnect on ASGI 2.4 servers when the next chunk fails to send,
which for a diffusion stream can be a whole block later. This one always listens for `http.disconnect` beside the
sender, cancels the body generator when it arrives (so the request is aborted in the engine before the next step),
and always closes the generator and calls `on_close`, whatever ended the response.
"""
from __future__ import annotations

from typing import AsyncIterator, Callable

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None] | None = None,
                 status_code: int = 200) -> None:
        self.body_iterator, self.on_close, self.status_code = body, on_close, status_code
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await send({"type": "http.response.start", "status": self.status_code,
                                    "headers": self.raw_headers})
                        async for chunk in self.body_iterator:
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    except OSError:  # the client is gone (ASGI 2.4 servers raise on send)
                        pass
                    tg.cancel_scope.cancel()

                async def listen() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(listen)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
            if self.on_close is not None:
                self.on_close()
