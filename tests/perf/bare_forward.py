"""The floor of the supervisor's hop: an aiohttp server whose POST /generate/sync sends the
request's body, as it came, to one wrapper and answers the wrapper's bytes.

    python -m tests.perf.bare_forward --wrapper-url URL --port N

No gate, no parsing, no queue, no metrics, no logging: what any Python HTTP forwarder in front
of the wrapper costs, for `stack_latency` to measure beside the public port in the same run.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def generate(request: web.Request) -> web.Response:
    body = await request.read()
    async with request.app[SESSION].post(
            request.app[UPSTREAM], data=body,
            headers={"Content-Type": "application/json"}) as upstream:
        data = await upstream.read()
        return web.Response(body=data, status=upstream.status,
                            content_type=upstream.content_type or "application/json")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "healthy"})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.perf.bare_forward")
    parser.add_argument("--wrapper-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.wrapper_url.rstrip("/") + "/generate/sync"

    async def session_ctx(app: web.Application):
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/generate/sync", generate)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
