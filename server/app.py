"""The FastAPI app: routes, OpenAI-shaped error handlers, API-key check, body-size limit, optional CORS.

    app = build_app(engine_client, ServerConfig(served_model_names=["tiny"]))

Routes reach the engine only through `EngineClient` (server/engine_client.py).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import PUBLIC_PATHS, ServerConfig
from .engine_client import EngineClient
from .errors import APIError
from .memory import TRIM_AFTER_BYTES, release_freed_memory
from .metrics import CONTENT_TYPE, Metrics
from .api_docs import add_api_docs
from .playground import add_playground, effective_defaults, special_tokens
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       ErrorResponse, ModelCard, ModelList)
from .serving import ClientDisconnected, OpenAIServing

log = logging.getLogger("unmask.server")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc} for code, desc in (
        (400, "Invalid request; `param` names the field"), (401, "Missing or wrong API key"),
        (404, "Unknown model"), (503, "Queue full or shutting down (see Retry-After)"))}


SSE_CONTENT: dict[str, Any] = {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}},
    "description": "With stream: true, one server-sent event per chunk: `data: <chunk JSON>` per finished block "
                   "(or `data: {\"error\": ...}`), then `data: [DONE]`."}}}}


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("unmask")
    except Exception:  # noqa: BLE001 - running from a source tree that is not installed
        return "0.1.0"


def build_app(engine: EngineClient, config: ServerConfig) -> FastAPI:
    metrics = Metrics(config.model_name, engine)
    serving = OpenAIServing(engine, config, metrics)
    app = FastAPI(title="unmask", version=_version(), docs_url=None, redoc_url=None,
                  description="OpenAI-compatible server for masked-diffusion language models. The diffusion "
                              "options (steps, block_length, remasking, threshold, ...) are top-level request "
                              "fields; OpenAI clients send them through `extra_body`.")
    app.state.serving, app.state.metrics, app.state.engine, app.state.config = serving, metrics, engine, config
    created = int(time.time())

    @app.post("/v1/chat/completions",
              responses={200: {"model": ChatCompletionResponse, **SSE_CONTENT}, **ERROR_RESPONSES},
              summary="Chat completion (streams one delta per finished block with stream: true)")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse, **SSE_CONTENT}, **ERROR_RESPONSES},
              summary="Text completion")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completion(body, request)

    @app.get("/v1/models", response_model=ModelList, summary="The served model")
    async def models() -> ModelList:
        info = engine.info
        return ModelList(data=[ModelCard(id=name, created=created, root=info.path, max_model_len=info.max_model_len,
                                         vocab_size=info.vocab_size,
                                         family=info.family, diffusion_defaults=effective_defaults(info, config),
                                         special_tokens=special_tokens(info))
                               for name in config.served_model_names])

    add_playground(app)
    add_api_docs(app)

    @app.head("/health", include_in_schema=False)  # load balancers probe with HEAD
    @app.get("/health", summary="200 while the engine loop is alive, 503 once it is dead or shutting down",
             response_class=Response, responses={200: {"description": "Alive (empty body)", "content": None},
                                                 503: {"description": "Dead or shutting down (empty body)"}})
    async def health() -> Response:
        ok = engine.healthy() and not serving.draining
        return Response(status_code=200 if ok else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": app.version}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"description": "Prometheus text format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        return APIError(exc.status_code, str(exc.detail), headers=headers).response()

    @app.exception_handler(ClientDisconnected)
    async def client_gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, f"internal server error ({type(exc).__name__})").response()

    # outermost last: request id (on every response) -> CORS (so browsers can read even a 401) -> API key ->
    # body limit -> routes
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if config.api_key is not None:
        app.add_middleware(APIKeyAuth, api_key=config.api_key)
    if config.allowed_origins:
        app.add_middleware(JSONErrorCORS, allow_origins=config.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(RequestIdHeader)
    return app


def _validation_response(errors: list[dict[str, Any]]) -> JSONResponse:
    """FastAPI's 422 as an OpenAI 400 naming the first bad field, e.g. `messages[0].content`."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _param(first.get("loc", ()))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        param, msg = None, f"the body is not valid JSON ({first.get('ctx', {}).get('error', msg)})"
    elif param is None:
        msg = f"the body must be a JSON object (Content-Type: application/json): {msg}"
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return APIError(400, f"{param}: {msg}{more}" if param else f"{msg}{more}", param).response()


def _param(loc: Any) -> str | None:
    parts: list[str] = []
    for p in loc:
        if p == "body" and not parts:
            continue
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif isinstance(p, str) and p.isidentifier():
            parts.append(("." if parts else "") + p)
    return "".join(parts) or None


class JSONErrorCORS(CORSMiddleware):
    """Starlette's CORS, with a rejected preflight answered by an OpenAI-shaped JSON 400 (not plain text)."""

    def preflight_response(self, request_headers: Any) -> Response:
        resp = super().preflight_response(request_headers)
        if resp.status_code < 400:
            return resp
        err = APIError(resp.status_code, f"CORS preflight refused: {resp.body.decode(errors='replace')}")
        out = err.response()
        for name, value in resp.headers.items():
            if name not in ("content-type", "content-length"):
                out.headers[name] = value
        return out


REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID_CHARS = frozenset(range(0x21, 0x7F))


class RequestIdHeader:
    """Every HTTP response carries `X-Request-Id`: the client's own (printable ASCII, up to 128 bytes) echoed, else
    a fresh random id. Pure ASGI."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = b""
        for name, value in scope.get("headers", ()):
            if name == REQUEST_ID_HEADER:
                rid = value
        if not (0 < len(rid) <= 128 and all(b in REQUEST_ID_CHARS for b in rid)):
            rid = uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = rid.decode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class APIKeyAuth:
    """401 unless `Authorization: Bearer <key>`; constant-time compare of SHA-256 digests. Public paths and CORS
    preflights pass. Pure ASGI (no BaseHTTPMiddleware), so streaming and disconnects are untouched."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        if not hmac.compare_digest(hashlib.sha256(given).digest(), self._digest) or not given:
            err = APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           headers={"WWW-Authenticate": "Bearer"}, type="AuthenticationError")
            return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over max_bytes: refused on Content-Length before reading, or as soon as the streamed body
    passes the limit. After a large body the freed memory is returned to the OS (server/memory.py)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.large_in_flight = 0
        """Requests with a declared body of at least TRIM_AFTER_BYTES being served."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"the request body exceeds the server's limit of {self.max_bytes} bytes")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await too_big.response()(scope, receive, send)
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI re-raises HTTPExceptions from body reading: a shaped 413
                    raise HTTPException(413, too_big.message)
            return message

        large = False
        try:
            for name, value in scope.get("headers", ()):
                if name == b"content-length" and value.isdigit() and int(value) >= TRIM_AFTER_BYTES:
                    large = True
                    self.large_in_flight += 1
            await self.app(scope, limited_receive, send)
        finally:
            if large:
                self.large_in_flight -= 1
            if large or seen >= TRIM_AFTER_BYTES:  # the body, its JSON and its model are garbage: pages back
                release_freed_memory(last_one=self.large_in_flight == 0)
