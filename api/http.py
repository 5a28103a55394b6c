"""Small HTTP pieces shared by the wrapper and the public server: JSON answers, error middleware."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)


def json_response(body: dict[str, Any], status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, headers=headers,
                        content_type="application/json")


def error_middleware(server: str, limit_setting: str):
    """413 as JSON naming the limit, 500 only for a bug (logged with its traceback)."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            limit = request.app._client_max_size
            return json_response({"error": f"request body too large: the limit is {limit} bytes "
                                           f"({limit_setting})", "status": "failed"}, 413)
        except (web.HTTPException, asyncio.CancelledError):
            raise
        except Exception:
            logger.exception("bug in the %s while serving %s %s", server, request.method,
                             request.path)
            return json_response({"error": f"internal error in the {server} (a bug; see its log)"},
                                 500)

    return middleware
