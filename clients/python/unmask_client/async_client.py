"""asyncio client: the same API as Client, every call awaited.

    from unmask_client import AsyncClient
    async with AsyncClient("http://127.0.0.1:8000") as c:
        r = await c.chat([{"role": "user", "content": "sort 3 1 2"}], cache="dual", threshold=0.9)
        async for chunk in await c.chat([{"role": "user", "content": "reverse 1 2 3"}], stream=True):
            print(chunk.text, end="", flush=True)          # one delta per finished block
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Literal, Mapping, Sequence, overload

import httpx
from pydantic import BaseModel
from typing_extensions import Unpack

from ._base import BaseClient, ChatOptions, CompletionOptions, build_body, message_dicts
from .errors import APIConnectionError, ReadyTimeoutError, UnmaskError, error_from_response
from .retry import RetryPolicy
from .streaming import AsyncStream
from .types import ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, ModelCard, ModelList


class AsyncClient(BaseClient):
    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, model: str | None = None,
                 connect_timeout: float = 5.0, read_timeout: float = 600.0, max_retries: int = 3,
                 retry: RetryPolicy | None = None, headers: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        """
        base_url: server root, with or without /v1 (default $UNMASK_BASE_URL or http://127.0.0.1:8000).
        api_key: sent as `Authorization: Bearer` (default $UNMASK_API_KEY).
        model: the model requests name (default: the first one the server lists).
        connect_timeout / read_timeout: seconds to connect, and between bytes of a response (a non-streaming
            generation sends nothing until it is done, so read_timeout bounds the whole generation).
        max_retries / retry: retries of 429, 503 and connection failures (see RetryPolicy).
        transport: an httpx transport (tests use httpx.MockTransport).
        """
        super().__init__(base_url, api_key, model, connect_timeout, read_timeout, max_retries, retry, headers)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, headers=self.headers,
                                  transport=transport)
        self._sleep = asyncio.sleep

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # transport ---------------------------------------------------------------------------------------------
    async def _send(self, method: str, path: str, json: Any = None, stream: bool = False,
              timeout: float | None = None) -> httpx.Response:
        """One request with retries; returns a 2xx response (a stream's body still unread) or raises."""
        attempt = 0
        while True:
            request = self._http.build_request(method, path, json=json,
                                               timeout=self.timeout if timeout is None else timeout)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                await self._sleep(self._judge_exception(exc, attempt))
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            try:
                await response.aread()
            finally:
                await response.aclose()
            delay = self._judge_response(response, attempt)
            if delay is None:
                self._raise_for_status(response)
            await self._sleep(delay)
            attempt += 1

    async def _model(self, model: str | None) -> str:
        if model is not None:
            return model
        if self.model is None:
            cards = await self.models()
            if not cards:
                raise UnmaskError(f"{self.base_url} serves no model")
            self.model = cards[0].id
        return self.model

    async def _post(self, path: str, body: dict[str, Any], stream: bool, timeout: float | None,
              kind: type[BaseModel], chunk_kind: type[BaseModel]) -> Any:
        response = await self._send("POST", path, json=body, stream=stream, timeout=timeout)
        if stream:
            return AsyncStream(response, chunk_kind)
        return kind.model_validate(response.json())

    # API -----------------------------------------------------------------------------------------------
    @overload
    async def chat(self, messages: Sequence[Mapping[str, Any] | BaseModel], *, stream: Literal[False] = False,
             **options: Unpack[ChatOptions]) -> ChatCompletion: ...

    @overload
    async def chat(self, messages: Sequence[Mapping[str, Any] | BaseModel], *, stream: Literal[True],
             **options: Unpack[ChatOptions]) -> AsyncStream[ChatCompletionChunk]: ...

    async def chat(self, messages: Sequence[Mapping[str, Any] | BaseModel], *, stream: bool = False,
             **options: Unpack[ChatOptions]) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        """POST /v1/chat/completions, as Client.chat (the same options, ChatOptions); with stream=True an async
        iterator of ChatCompletionChunk."""
        fields = build_body("chat", options, stream)
        body = {"model": await self._model(options.get("model")), "messages": message_dicts(messages), **fields}
        return await self._post("/v1/chat/completions", body, stream, options.get("timeout"), ChatCompletion,
                               ChatCompletionChunk)

    @overload
    async def complete(self, prompt: str | list[str] | list[int] | list[list[int]], *, stream: Literal[False] = False,
                 **options: Unpack[CompletionOptions]) -> Completion: ...

    @overload
    async def complete(self, prompt: str | list[str] | list[int] | list[list[int]], *, stream: Literal[True],
                 **options: Unpack[CompletionOptions]) -> AsyncStream[CompletionChunk]: ...

    async def complete(self, prompt: str | list[str] | list[int] | list[list[int]], *, stream: bool = False,
                 **options: Unpack[CompletionOptions]) -> Completion | AsyncStream[CompletionChunk]:
        """POST /v1/completions: a raw prompt (string, strings, token ids, lists of token ids), no chat template.
        The options are chat()'s but max_completion_tokens, tools and tool_choice."""
        fields = build_body("complete", options, stream)
        body = {"model": await self._model(options.get("model")), "prompt": prompt, **fields}
        return await self._post("/v1/completions", body, stream, options.get("timeout"), Completion, CompletionChunk)

    async def models(self) -> list[ModelCard]:
        """GET /v1/models."""
        return ModelList.model_validate((await self._send("GET", "/v1/models")).json()).data

    async def health(self) -> bool:
        """GET /health (never retried): True on 200, False on 503 (engine dead or not ready). An unreachable
        server raises APIConnectionError."""
        return (await self._health_response()).status_code == 200

    async def _health_response(self) -> httpx.Response:
        try:
            response = await self._http.get("/health")
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{type(exc).__name__} talking to {self.base_url}: {exc}") from exc
        if response.status_code not in (200, 503):
            raise error_from_response(response)
        return response

    async def version(self) -> str:
        """GET /version."""
        return str((await self._send("GET", "/version")).json().get("version"))

    async def metrics(self) -> str:
        """GET /metrics: the Prometheus text exposition."""
        return (await self._send("GET", "/metrics")).text

    async def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        """Poll /health until it answers 200; ReadyTimeoutError after `timeout` seconds (connection refused and
        503 count as not ready yet)."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            try:
                if await self.health():
                    return
                last = "/health answered 503"
            except APIConnectionError as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise ReadyTimeoutError(f"{self.base_url} not ready after {timeout:g}s: {last}")
            await self._sleep(min(interval, max(deadline - time.monotonic(), 0.0)))
