"""Typed exceptions. Every error the server sends back carries its message, HTTP status, `param` and `type`.

    UnmaskError
    ├── APIError                    the server answered with an error (status, message, param, type, code)
    │   ├── BadRequestError         400 (param names the offending field)
    │   ├── AuthenticationError     401
    │   ├── NotFoundError           404 (unknown model or route)
    │   ├── RateLimitError          429
    │   ├── InternalServerError     5xx other than 503
    │   ├── ServiceUnavailableError 503 (queue full, engine dead); retry_after in seconds when the server said
    │   └── StreamError             an error event inside a stream that had already started
    ├── APIConnectionError          no answer: connection refused or reset, DNS, a stream cut short
    │   └── APITimeoutError         connect or read timeout
    └── ReadyTimeoutError           wait_until_ready ran out of time
"""
from __future__ import annotations

import json
from typing import Any

import httpx


class UnmaskError(Exception):
    """Base class of every exception this package raises."""


class APIError(UnmaskError):
    def __init__(self, message: str, status: int | None = None, param: str | None = None,
                 type: str | None = None, code: Any = None, body: Any = None) -> None:
        super().__init__(message if status is None else f"{status}: {message}")
        self.message = message
        self.status = status
        self.param = param
        self.type = type
        self.code = code
        self.body = body


class BadRequestError(APIError):
    pass


class AuthenticationError(APIError):
    pass


class NotFoundError(APIError):
    pass


class RateLimitError(APIError):
    pass


class InternalServerError(APIError):
    pass


class ServiceUnavailableError(APIError):
    def __init__(self, *args: Any, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class StreamError(APIError):
    """The server sent `data: {"error": ...}` after the stream's 200 had started."""


class APIConnectionError(UnmaskError):
    pass


class APITimeoutError(APIConnectionError):
    pass


class ReadyTimeoutError(UnmaskError, TimeoutError):
    pass


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError,
    422: BadRequestError, 429: RateLimitError, 503: ServiceUnavailableError,
}


def error_fields(body: Any) -> dict[str, Any]:
    """message/param/type/code from an OpenAI-shaped body {"error": {...}}, a flat one, or {"error": "text"}."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, str):
            return {"message": inner}
        if isinstance(inner, dict):
            msg = inner.get("message")
            if not isinstance(msg, str):
                msg = json.dumps(inner) if inner else None
            return {"message": msg, "param": inner.get("param"), "type": inner.get("type"), "code": inner.get("code")}
    return {}


def error_from_response(response: httpx.Response, retry_after: float | None = None) -> APIError:
    """The typed exception for a non-2xx response (its body must have been read)."""
    status = response.status_code
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    fields = error_fields(body)
    message = fields.pop("message", None) or (body if isinstance(body, str) and body else response.reason_phrase)
    cls = _BY_STATUS.get(status, InternalServerError if status >= 500 else APIError)
    if cls is ServiceUnavailableError:
        return ServiceUnavailableError(message, status, body=body, retry_after=retry_after, **fields)
    return cls(message, status, body=body, **fields)


def stream_error(payload: dict[str, Any]) -> StreamError:
    fields = error_fields(payload)
    code = fields.get("code")
    status = code if isinstance(code, int) else None
    return StreamError(fields.pop("message", None) or "error event in stream", status, body=payload, **fields)
