"""Pages for people: the playground at `/` (static files, vendored three.js), the API docs at
`/docs` (vendored swagger-ui: no CDN at run time) and the OpenAPI document."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from da3_serverless.config import Settings
from da3_serverless.server.docs import openapi_document

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"


def add_page_routes(app: FastAPI, settings: Settings) -> None:
    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title=f"{app.title} API",
            swagger_js_url="/static/vendor/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/vendor/swagger-ui/swagger-ui.css",
            swagger_favicon_url="data:,",
        )  # fmt: skip

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.openapi = lambda: openapi_document(app, settings)  # type: ignore[method-assign]
