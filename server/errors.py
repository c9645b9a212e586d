"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, `code` being the HTTP status."""
from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
               404: "NotFoundError", 405: "MethodNotAllowedError", 408: "RequestTimeoutError",
               413: "RequestTooLargeError", 429: "RateLimitError", 500: "InternalServerError",
               501: "NotImplementedError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error to send to the client as an OpenAI-shaped body with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = headers
        self.type = type or ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": _printable(self.message), "type": self.type, "param": _printable(self.param),
                          "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _printable(text: str | None) -> str | None:
    """Text that always encodes as UTF-8: a lone surrogate echoed from a request becomes an escape (\\ud800)."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)
