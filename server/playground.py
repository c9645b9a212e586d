"""The playground: a static page (server/static/) that streams a chat completion with
`stream_options.include_steps` and draws the canvas filling in, step by step.

    GET /            -> redirect to /playground
    GET /playground  -> playground.html (+ /playground.js, /playground.css)

The files ship in the package and the page makes no request outside this server (its Content-Security-Policy
allows only 'self'). It reads the model's defaults from /v1/models (`diffusion_defaults`, `special_tokens`); when
the server has an API key, that call answers 401 and the page asks for the key.
"""
from __future__ import annotations

import dataclasses
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response

from engine.param_schema import fixed_defaults

from .config import ServerConfig
from .engine_client import ModelInfo

STATIC = {"/playground": ("playground.html", "text/html; charset=utf-8"),
          "/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
          "/playground.css": ("playground.css", "text/css; charset=utf-8")}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

REQUEST_DEFAULTS = fixed_defaults()
"""SamplingParams defaults of the request fields a model's generation config does not set (from the schema)."""


def effective_defaults(info: ModelInfo, config: ServerConfig) -> dict[str, Any]:
    """The value each unset request field takes: server-wide defaults over the model's."""
    values = {**REQUEST_DEFAULTS, **dataclasses.asdict(info.defaults)}  # the family's threshold / cache win
    if info.defaults.steps_per_block:  # block diffusion (LLaDA2): unset steps = this many per denoised block, which
        # depends on the prompt, and a `steps` sent is a total: report no total (a client echoing it back would
        # otherwise ask for one step per block)
        values.update(steps=None, steps_per_block=info.defaults.steps_per_block)
    values.update({k: v for k, v in config.sampling_defaults.items() if v is not None})
    return values


def special_tokens(info: ModelInfo) -> dict[str, Any]:
    return {"mask_token_id": info.mask_token_id, "eos_token_id": info.eos_token_id,
            "stop_token_ids": list(info.stop_token_ids)}


def _read(name: str) -> bytes:
    return resources.files("server").joinpath("static", name).read_bytes()


def add_playground(app: FastAPI) -> None:
    files = {path: (_read(name), media) for path, (name, media) in STATIC.items()}  # read once, at start-up
    headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return RedirectResponse("/playground", status_code=307)

    def static_route(body: bytes, media: str) -> Any:
        async def serve() -> Response:
            return Response(body, media_type=media, headers=headers)
        return serve

    for path, (body, media) in files.items():
        app.add_api_route(path, static_route(body, media), methods=["GET"], include_in_schema=False)
