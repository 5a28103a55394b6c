"""The admin interface: HTTP over a Unix socket (mode 0660) for `comfy-worker health` and friends.

Routes: GET /status (the full snapshot), POST /restart/comfyui, POST /benchmark, POST /drain,
POST /resume; each action takes `?instance=N` for one instance of a multi-GPU host (all by default). Only local users in the socket's group reach it; nothing of it is on the public port.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

logger = logging.getLogger(__name__)

SOCKET_MODE = 0o660


class AdminServer:
    def __init__(self, path: Path, *, snapshot: Callable[[], dict[str, Any]],
                 actions: dict[str, Callable[[dict[str, str]], Awaitable[dict[str, Any]]]]):
        self.path = path
        self.snapshot = snapshot
        self.actions = actions
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/status", self._status)
        app.router.add_post("/{action:.+}", self._action)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()  # a stale socket from a killed daemon
        site = web.UnixSite(self.runner, str(self.path))
        await site.start()
        os.chmod(self.path, SOCKET_MODE)
        logger.info("admin socket at %s (mode %o)", self.path, SOCKET_MODE)

    async def close(self) -> None:
        if self.runner:
            await self.runner.cleanup()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot(), dumps=_dumps)

    async def _action(self, request: web.Request) -> web.Response:
        name = request.match_info["action"]
        action = self.actions.get(name)
        if action is None:
            return web.json_response({"error": f"unknown action {name}",
                                      "actions": sorted(self.actions)}, status=404)
        return web.json_response(await action(dict(request.query)), dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)


async def admin_request(path: Path, method: str, route: str, timeout: float = 5.0
                        ) -> dict[str, Any]:
    """Talk to a running daemon; raises OSError / aiohttp.ClientError when it is not there."""
    connector = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.request(method, f"http://localhost{route}") as response:
            response.raise_for_status()
            return await response.json()
