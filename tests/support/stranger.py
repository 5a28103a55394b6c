"""A stranger on ComfyUI's port: a process that is not ours answering ComfyUI's probes (the soak's
fault and the requeue tests' adversary)."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web


class Stranger:
    """Answers ComfyUI's probes like a leftover ComfyUI would; counts prompts sent to it (the
    daemon must never adopt it, so that count must stay 0)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.prompts = 0
        self.runner: web.AppRunner | None = None

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"system": {"comfyui_version": "stranger"}, "devices": []})

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"type": "status", "data": {"status": {"exec_info": {
            "queue_remaining": 0}}, "sid": "x"}})
        async for _ in ws:
            pass
        return ws

    async def _queue(self, request: web.Request) -> web.Response:
        return web.json_response({"queue_running": [], "queue_pending": []})

    async def _prompt(self, request: web.Request) -> web.Response:
        self.prompts += 1
        return web.json_response({"error": "stranger"}, status=500)

    async def hold(self, seconds_to_bind: float = 2.0) -> bool:
        """Bind the port as soon as it is free (within `seconds_to_bind`); True when held."""
        app = web.Application()
        app.router.add_get("/system_stats", self._stats)
        app.router.add_get("/ws", self._ws)
        app.router.add_post("/prompt", self._prompt)
        app.router.add_get("/queue", self._queue)
        # A short shutdown: open WebSockets (probes, the daemon's watch) must not hold release().
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        deadline = time.monotonic() + seconds_to_bind
        while time.monotonic() < deadline:
            try:
                await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
                return True
            except OSError:
                await asyncio.sleep(0.005)
        return False

    async def release(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
