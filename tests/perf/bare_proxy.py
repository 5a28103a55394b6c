"""The floor of one extra HTTP hop: an aiohttp server whose POST /generate/sync does nothing
but ComfyClient.run_prompt on the request's workflow_json and answer a small JSON.

    python -m tests.perf.bare_proxy --comfy-url URL --port N

No queue, no outputs, no result store: what any Python HTTP service in front of ComfyUI costs,
for `wrapper_latency` to measure beside the wrapper in the same run.
"""

from __future__ import annotations

import argparse

from aiohttp import web

from api.comfy import ComfyClient

CLIENT = web.AppKey("client", ComfyClient)


async def generate(request: web.Request) -> web.Response:
    body = await request.json()
    result = await request.app[CLIENT].run_prompt(body["input"]["workflow_json"])
    return web.json_response({"status": "completed", "prompt_id": result.prompt_id,
                              "output": [{"filename": o.filename} for o in result.outputs]})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "healthy"})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.perf.bare_proxy")
    parser.add_argument("--comfy-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()

    async def client_ctx(app: web.Application):
        async with ComfyClient(args.comfy_url) as client:
            app[CLIENT] = client
            yield

    app.cleanup_ctx.append(client_ctx)
    app.router.add_post("/generate/sync", generate)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
