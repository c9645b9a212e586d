"""What Client and AsyncClient share: configuration, request bodies, error handling around one attempt."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import httpx
from pydantic import BaseModel

from .errors import APIConnectionError, APITimeoutError, error_from_response
from .params import SAMPLING_OPTIONS, SamplingOptions
from .retry import RETRY_STATUSES, RetryPolicy, is_retryable_exception, parse_retry_after

API_KEY_ENV = "UNMASK_API_KEY"


class CompletionOptions(SamplingOptions, total=False):
    """The keyword arguments of `complete()` (and, with max_completion_tokens, of `chat()`): the request options
    of params.py (generated from the server's schema) plus OpenAI's and this client's own."""
    model: str | None
    """The served model (default: the client's, else the first one the server lists)."""
    n: int | None
    """Choices per prompt (with a seed, choice i uses seed + i)."""
    user: str | None
    include_usage: bool | None
    """stream=True: end with a usage chunk (default on)."""
    include_steps: bool | None
    """stream=True (unmask extension): one chunk per denoising step whose `.step` is a DiffusionStep."""
    response_format: Mapping[str, Any] | None
    """Structured outputs (valid when finish_reason is "stop"): {"type": "json_object"} or {"type":
    "json_schema", "json_schema": {"name", "schema"}}."""
    structured_outputs: Mapping[str, Any] | None
    """One of {"json": schema}, {"regex": r"..."}, {"choice": [...]}, {"grammar": llguidance Lark},
    {"json_object": True}."""
    extra_body: Mapping[str, Any] | None
    """More JSON fields, sent as they are."""
    timeout: float | None
    """Read timeout of this call in seconds."""


class ChatOptions(CompletionOptions, total=False):
    max_completion_tokens: int | None
    """Generation length (OpenAI's newer name for max_tokens; wins if both are set)."""
    tools: Sequence[Mapping[str, Any]] | None
    """OpenAI function tools."""
    tool_choice: str | Mapping[str, Any] | None
    """"required" or {"type": "function", "function": {"name": ...}} forces a call, returned in
    message.tool_calls."""


BODY_FIELDS = (*SAMPLING_OPTIONS, "max_completion_tokens", "n", "user", "response_format", "structured_outputs",
               "tools", "tool_choice")
"""Request fields sent as they are; unset (None) ones are not sent."""


def normalize_base_url(base_url: str) -> str:
    """'http://host:8000', 'http://host:8000/' and 'http://host:8000/v1' all mean the server root."""
    url = base_url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    return url


def build_body(call: str, options: Mapping[str, Any], stream: bool) -> dict[str, Any]:
    """The JSON body of a chat()/complete() call from its keyword arguments (model, timeout are the caller's)."""
    allowed = (ChatOptions if call == "chat" else CompletionOptions).__optional_keys__
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise TypeError(f"{call}() got an unexpected keyword argument {unknown[0]!r}")
    body = {k: options[k] for k in BODY_FIELDS if options.get(k) is not None}
    include_usage, include_steps = options.get("include_usage"), options.get("include_steps")
    extra_body = options.get("extra_body")
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True if include_usage is None else include_usage}
        if include_steps:
            body["stream_options"]["include_steps"] = True
    elif include_usage is not None:
        raise ValueError("include_usage only applies to stream=True")
    elif include_steps:
        raise ValueError("include_steps only applies to stream=True")
    if extra_body:
        body.update(extra_body)
    return body


def message_dicts(messages: Sequence[Mapping[str, Any] | BaseModel]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    return [m.model_dump(exclude_none=True) if isinstance(m, BaseModel) else dict(m) for m in messages]


class BaseClient:
    def __init__(self, base_url: str | None, api_key: str | None, model: str | None, connect_timeout: float,
                 read_timeout: float, max_retries: int, retry: RetryPolicy | None,
                 headers: Mapping[str, str] | None) -> None:
        self.base_url = normalize_base_url(base_url or os.environ.get("UNMASK_BASE_URL", "http://127.0.0.1:8000"))
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.model = model
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self.retry = retry if retry is not None else RetryPolicy(max_retries=max_retries)
        self.headers = {"Accept": "application/json", **(headers or {})}
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"

    # one attempt's outcome -> response to return, delay before retrying, or exception to raise
    def _judge_response(self, response: httpx.Response, attempt: int) -> float | None:
        """None: the response is final (raise or return it); else: seconds to wait before the next attempt."""
        if response.status_code in RETRY_STATUSES and attempt < self.retry.max_retries:
            return self.retry.delay(attempt, parse_retry_after(response))
        return None

    def _judge_exception(self, exc: Exception, attempt: int) -> float:
        """Seconds to wait before retrying a failed attempt; raises the typed error when it must not be retried."""
        if is_retryable_exception(exc) and attempt < self.retry.max_retries:
            return self.retry.delay(attempt, None)
        if isinstance(exc, httpx.TimeoutException):
            raise APITimeoutError(f"{type(exc).__name__} talking to {self.base_url}: {exc}") from exc
        raise APIConnectionError(f"{type(exc).__name__} talking to {self.base_url}: {exc}") from exc

    @staticmethod
    def _raise_for_status(response: httpx.Response) -> None:
        if response.status_code >= 400:
            raise error_from_response(response, parse_retry_after(response))
