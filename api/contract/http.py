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


#: Keyword arguments for the AppRunner of every server of ours. Request bodies are taken as sent:
#: aiohttp's own decompression left a request waiting forever when a body that does not
#: decompress arrived after its headers (the error went to a second, phantom request while the
#: first waited for the rest of its body), so a content coding is refused at the door instead
#: (`error_middleware`), which also keeps a small compressed body from growing past the limits.
SERVER_OPTIONS: dict[str, Any] = {"auto_decompress": False}

#: Content codings a request body may carry: none.
_IDENTITY = ("", "identity")


def error_middleware(server: str, limit_setting: str):
    """415 for a compressed body, 413 as JSON naming the limit, 500 only for a bug (logged with
    its traceback)."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        coding = request.headers.get("Content-Encoding", "").strip().lower()
        if coding not in _IDENTITY and request.body_exists:
            return json_response({"error": "request bodies are taken uncompressed: send the body "
                                           "without Content-Encoding (it was "
                                           f"{coding[:40]!r})", "status": "failed"}, 415)
        try:
            return await handler(request)
        except web.RequestPayloadError as exc:
            # e.g. "Content-Encoding: gzip" on a body that is not gzip: the client's mistake.
            return json_response({"error": f"request body could not be read: {exc}",
                                  "status": "failed"}, 400)
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


async def expect_handler(request: web.Request) -> None:
    """`Expect: 100-continue` is honoured; anything else is 417 with a fixed text.

    aiohttp's default handler echoes the header back and fails (500) on bytes that are not
    UTF-8; this one never echoes what the client sent.
    """
    expect = request.headers.get("EXPECT", "")
    if request.version == (1, 1):
        if expect.lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        else:
            raise web.HTTPExpectationFailed(text="unknown Expect header")
