"""`/docs`: FastAPI's Swagger UI page, served with Swagger UI's own files from the `swagger-ui-bundle-v2` package
instead of a CDN, so the API reference renders on machines without internet access (FastAPI's default page loads
its JS and CSS from jsdelivr). ReDoc (CDN-only) is not served; `/openapi.json` is the machine-readable schema.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response

ASSETS = {"/docs/swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript"),
          "/docs/swagger-ui.css": ("swagger-ui.css", "text/css"),
          "/docs/favicon-32x32.png": ("favicon-32x32.png", "image/png")}
"""URL path -> (file in Swagger UI's distribution, media type)."""
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", *ASSETS)


def add_api_docs(app: FastAPI) -> None:
    """Serve /docs and its assets from the installed Swagger UI distribution (read once, at start-up). The app must
    be built with docs_url=None and redoc_url=None."""
    from swagger_ui_bundle import swagger_ui_path
    files = {path: ((swagger_ui_path / name).read_bytes(), media) for path, (name, media) in ASSETS.items()}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API",
                                   oauth2_redirect_url="/docs/oauth2-redirect",
                                   swagger_js_url="/docs/swagger-ui-bundle.js", swagger_css_url="/docs/swagger-ui.css",
                                   swagger_favicon_url="/docs/favicon-32x32.png")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    def asset(body: bytes, media: str) -> Any:
        async def serve() -> Response:
            return Response(body, media_type=media, headers={"Cache-Control": "public, max-age=86400"})
        return serve

    for path, (body, media) in files.items():
        app.add_api_route(path, asset(body, media), methods=["GET"], include_in_schema=False)
