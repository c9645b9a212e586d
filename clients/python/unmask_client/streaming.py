"""Server-sent events -> typed chunks, for a response that is already open (status 200 checked).

The server sends `data: <json>` events: one per finished block (and the role first, the finish reason last, the
usage before the end), then `data: [DONE]`. An error after the stream started arrives as `data: {"error": ...}`
and is raised as StreamError. A connection that drops mid-stream raises APIConnectionError; nothing is re-sent.
"""
from __future__ import annotations

import json
from typing import AsyncIterator, Generic, Iterator, TypeVar

import httpx
from pydantic import BaseModel

from .errors import APIConnectionError, APITimeoutError, stream_error

T = TypeVar("T", bound=BaseModel)
DONE = "[DONE]"


class SSEDecoder:
    """Feeds lines, returns the data of each complete event (multi-line data joined with newlines)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        return self.feed("")


def _parse(data: str, kind: type[T]) -> T | None:
    """The chunk of one event, None at [DONE]; raises StreamError for an error event."""
    if data.strip() == DONE:
        return None
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise APIConnectionError(f"malformed event in stream: {data[:200]!r}") from exc
    if isinstance(payload, dict) and "error" in payload and "choices" not in payload:
        raise stream_error(payload)
    return kind.model_validate(payload)


def _transport_error(exc: httpx.HTTPError) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"stream timed out: {exc!r}")
    return APIConnectionError(f"stream interrupted: {exc!r}")


class Stream(Generic[T]):
    """Iterator of chunks; closes the connection when exhausted, on error, on `close()` or leaving a `with`."""

    def __init__(self, response: httpx.Response, kind: type[T]) -> None:
        self.response = response
        self._kind = kind
        self._iter = self._events()

    def _events(self) -> Iterator[T]:
        dec = SSEDecoder()
        try:
            try:
                for line in self.response.iter_lines():
                    data = dec.feed(line)
                    if data is not None:
                        chunk = _parse(data, self._kind)
                        if chunk is None:
                            return
                        yield chunk
            except httpx.HTTPError as exc:
                raise _transport_error(exc) from exc
            data = dec.flush()
            if data is not None and (chunk := _parse(data, self._kind)) is not None:
                yield chunk
            raise APIConnectionError("stream ended without [DONE]")
        finally:
            self.response.close()

    def __iter__(self) -> Iterator[T]:
        return self._iter

    def __next__(self) -> T:
        return next(self._iter)

    def close(self) -> None:
        self._iter.close()
        self.response.close()

    def __enter__(self) -> "Stream[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(Generic[T]):
    """Async iterator of chunks; `async with` or `await close()` releases the connection early."""

    def __init__(self, response: httpx.Response, kind: type[T]) -> None:
        self.response = response
        self._kind = kind
        self._iter = self._events()

    async def _events(self) -> AsyncIterator[T]:
        dec = SSEDecoder()
        try:
            try:
                async for line in self.response.aiter_lines():
                    data = dec.feed(line)
                    if data is not None:
                        chunk = _parse(data, self._kind)
                        if chunk is None:
                            return
                        yield chunk
            except httpx.HTTPError as exc:
                raise _transport_error(exc) from exc
            data = dec.flush()
            if data is not None and (chunk := _parse(data, self._kind)) is not None:
                yield chunk
            raise APIConnectionError("stream ended without [DONE]")
        finally:
            await self.response.aclose()

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iter

    async def __anext__(self) -> T:
        return await self._iter.__anext__()

    async def close(self) -> None:
        await self._iter.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> "AsyncStream[T]":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
