"""`GET /openapi.json` and a Swagger UI page at `GET /docs`, for the wrapper and the public port.

The page's JavaScript and CSS come from the swagger-ui-py package's files on this machine, never
from the internet (a GPU host may have none). The package is only looked up, not imported: its
Python side is a web-framework plug-in this project does not use.
"""

from __future__ import annotations

import asyncio
import html
import importlib.util
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from api.contract.http import json_response
from api.contract.openapi import DOC_ASSETS

logger = logging.getLogger(__name__)

#: Returns a refusal for a request that may not read the docs, or None to let it in.
Guard = Callable[[web.Request], "web.Response | None"]
DocumentFactory = Callable[[], dict[str, Any]]

_ASSET_TYPES = {"js": "text/javascript", "css": "text/css", "png": "image/png"}

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="icon" type="image/png" href="docs/favicon-32x32.png">
<link rel="stylesheet" href="docs/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout", tryItOutEnabled: false}});
</script>
</body>
</html>
"""


def swagger_ui_dir() -> Path | None:
    """Where swagger-ui-py keeps Swagger UI's files, or None when it is not installed."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "static"
    return folder if folder.is_dir() else None


def add_doc_routes(app: web.Application, document: DocumentFactory, *, title: str,
                   guard: Guard | None = None) -> None:
    """Serve the document (built in a thread: an operator's modifier files may be read) and
    the page. `guard` may refuse a request (the public port's token)."""
    assets = swagger_ui_dir()
    if assets is None:
        logger.warning("swagger-ui-py is not installed: /docs answers 404 (the document is "
                       "still at /openapi.json)")

    def guarded(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            refusal = guard(request) if guard else None
            return refusal if refusal is not None else await handler(request)
        return wrapped

    async def openapi(request: web.Request) -> web.StreamResponse:
        return json_response(await asyncio.to_thread(document))

    async def page(request: web.Request) -> web.StreamResponse:
        if assets is None:
            return json_response({"error": "the documentation page needs the swagger-ui-py "
                                           "package; the document is at /openapi.json"}, 404)
        return web.Response(text=_PAGE.format(title=html.escape(title)),
                            content_type="text/html")

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["asset"]
        if assets is None or name not in DOC_ASSETS:
            return json_response({"error": f"no file {name} here"}, 404)
        return web.FileResponse(assets / name, headers={
            "Cache-Control": "max-age=86400", "Content-Type": _ASSET_TYPES[name.rpartition(".")[2]]})

    app.router.add_get("/openapi.json", guarded(openapi))
    app.router.add_get("/docs", guarded(page))
    app.router.add_get("/docs/{asset}", guarded(asset))
