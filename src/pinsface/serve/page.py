"""The web page (``/``, plain HTML/CSS/JS in ``static/``) and the API's own page (``/docs``, Swagger UI served
from the installed swagger-ui-py, no CDN). Neither holds data, so neither needs the key."""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

router = APIRouter(include_in_schema=False)


@functools.cache
def swagger_assets() -> Path | None:
    """swagger-ui-py's files; None without it (``/docs`` then only links to the API description)."""
    try:
        import swagger_ui
    except ImportError:
        return None
    return Path(swagger_ui.__file__).parent / "static"


def mount_assets(app) -> None:
    """Serve the page's files and Swagger UI's (a router cannot carry mounts)."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if swagger_assets() is not None:
        app.mount("/docs/assets", StaticFiles(directory=swagger_assets()), name="docs")


@router.get("/")
async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/docs")
async def docs():
    from fastapi.openapi.docs import get_swagger_ui_html

    if swagger_assets() is None:
        return HTMLResponse(
            "<p>Install swagger-ui-py for this page; the API description is "
            '<a href="/openapi.json">/openapi.json</a>.</p>'
        )
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="pinsface API",
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="/docs/assets/favicon-32x32.png",
    )
