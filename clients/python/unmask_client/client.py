"""Synchronous client.

    from unmask_client import Client
    with Client("http://127.0.0.1:8000") as c:
        r = c.chat([{"role": "user", "content": "sort 3 1 2"}], max_tokens=32, cache="dual", threshold=0.9)
        print(r.text, r.usage.completion_tokens, r.diffusion.tokens_per_forward)
        for chunk in c.chat([{"role": "user", "content": "reverse 1 2 3"}], stream=True, block_length=4):
            print(chunk.text, end="", flush=True)          # one delta per finished block
"""
from __future__ import annotations

import time
from typing import Any, Literal, Mapping, Sequence, overload

import httpx
from pydantic import BaseModel
from typing_extensions import Unpack

from ._base import BaseClient, ChatOptions, CompletionOptions, build_body, message_dicts
from .errors import APIConnectionError, ReadyTimeoutError, UnmaskError, error_from_response
from .retry import RetryPolicy
from .streaming import Stream
from .types import ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, ModelCard, ModelList


class Client(BaseClient):
    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, model: str | None = None,
                 connect_timeout: float = 5.0, read_timeout: float = 600.0, max_retries: int = 3,
                 retry: RetryPolicy | None = None, headers: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
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
        self._http = httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=self.headers,
                                  transport=transport)
        self._sleep = time.sleep

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # transport ---------------------------------------------------------------------------------------------
    def _send(self, method: str, path: str, json: Any = None, stream: bool = False,
              timeout: float | None = None) -> httpx.Response:
        """One request with retries; returns a 2xx response (a stream's body still unread) or raises."""
        attempt = 0
        while True:
            request = self._http.build_request(method, path, json=json,
                                               timeout=self.timeout if timeout is None else timeout)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                self._sleep(self._judge_exception(exc, attempt))
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            try:
                response.read()
            finally:
                response.close()
            delay = self._judge_response(response, attempt)
            if delay is None:
                self._raise_for_status(response)
            self._sleep(delay)
            attempt += 1

    def _model(self, model: str | None) -> str:
        if model is not None:
            return model
        if self.model is None:
            cards = self.models()
            if not cards:
                raise UnmaskError(f"{self.base_url} serves no model")
            self.model = cards[0].id
        return self.model

    def _post(self, path: str, body: dict[str, Any], stream: bool, timeout: float | None,
              kind: type[BaseModel], chunk_kind: type[BaseModel]) -> Any:
        response = self._send("POST", path, json=body, stream=stream, timeout=timeout)
        if stream:
            return Stream(response, chunk_kind)
        return kind.model_validate(response.json())

    # API -----------------------------------------------------------------------------------------------
    @overload
    def chat(self, messages: Sequence[Mapping[str, Any] | BaseModel], *, stream: Literal[False] = False,
             **options: Unpack[ChatOptions]) -> ChatCompletion: ...

    @overload
    def chat(self, messages: Sequence[Mapping[str, Any] | BaseModel], *, stream: Literal[True],
             **options: Unpack[ChatOptions]) -> Stream[ChatCompletionChunk]: ...

    def chat(self, messages: Sequence[Mapping[str, Any] | BaseModel], *, stream: bool = False,
             **options: Unpack[ChatOptions]) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """POST /v1/chat/completions. With stream=True, an iterator of ChatCompletionChunk: the role, then one
        content delta per finished block, the finish reason, and the usage (include_usage, default on).
        include_steps=True (unmask extension) adds one chunk per denoising step whose `.step` is a DiffusionStep
        (positions committed and their tokens); StepCanvas replays them.

        The options (typed: ChatOptions) are the request options of params.SamplingOptions (max_tokens,
        temperature, top_p, seed, stop, and the diffusion options steps, block_length, remasking, threshold,
        factor, cfg_scale, cache, top_k, ignore_eos, algorithm, alg_temp; unset: the server's or the model's
        defaults), plus max_completion_tokens, n, user, structured outputs (response_format, structured_outputs,
        tools, tool_choice: guaranteed valid when finish_reason is "stop"), model, include_usage, include_steps,
        extra_body (more JSON fields, sent as they are) and timeout (read timeout of this call in seconds).
        """
        fields = build_body("chat", options, stream)
        body = {"model": self._model(options.get("model")), "messages": message_dicts(messages), **fields}
        return self._post("/v1/chat/completions", body, stream, options.get("timeout"), ChatCompletion,
                               ChatCompletionChunk)

    @overload
    def complete(self, prompt: str | list[str] | list[int] | list[list[int]], *, stream: Literal[False] = False,
                 **options: Unpack[CompletionOptions]) -> Completion: ...

    @overload
    def complete(self, prompt: str | list[str] | list[int] | list[list[int]], *, stream: Literal[True],
                 **options: Unpack[CompletionOptions]) -> Stream[CompletionChunk]: ...

    def complete(self, prompt: str | list[str] | list[int] | list[list[int]], *, stream: bool = False,
                 **options: Unpack[CompletionOptions]) -> Completion | Stream[CompletionChunk]:
        """POST /v1/completions: a raw prompt (string, strings, token ids, lists of token ids), no chat template.
        The options are chat()'s but max_completion_tokens, tools and tool_choice."""
        fields = build_body("complete", options, stream)
        body = {"model": self._model(options.get("model")), "prompt": prompt, **fields}
        return self._post("/v1/completions", body, stream, options.get("timeout"), Completion, CompletionChunk)

    def models(self) -> list[ModelCard]:
        """GET /v1/models."""
        return ModelList.model_validate(self._send("GET", "/v1/models").json()).data

    def health(self) -> bool:
        """GET /health (never retried): True on 200, False on 503 (engine dead or not ready). An unreachable
        server raises APIConnectionError."""
        return self._health_response().status_code == 200

    def _health_response(self) -> httpx.Response:
        try:
            response = self._http.get("/health")
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{type(exc).__name__} talking to {self.base_url}: {exc}") from exc
        if response.status_code not in (200, 503):
            raise error_from_response(response)
        return response

    def version(self) -> str:
        """GET /version."""
        return str(self._send("GET", "/version").json().get("version"))

    def metrics(self) -> str:
        """GET /metrics: the Prometheus text exposition."""
        return self._send("GET", "/metrics").text

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        """Poll /health until it answers 200; ReadyTimeoutError after `timeout` seconds (connection refused and
        503 count as not ready yet)."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            try:
                if self.health():
                    return
                last = "/health answered 503"
            except APIConnectionError as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise ReadyTimeoutError(f"{self.base_url} not ready after {timeout:g}s: {last}")
            self._sleep(min(interval, max(deadline - time.monotonic(), 0.0)))
