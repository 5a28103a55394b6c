"""The /metrics listener: the worker's figures for the operator's Prometheus, and no one else.

It is a listener of its own (`metrics.host`:`metrics.port`, 127.0.0.1:9188 by default), never the
public port: the figures name GPUs by UUID, show the fleet's internals and load, and whoever may
send a request must not read them. Off loopback it wants a bearer token (`metrics.token`) unless
the operator says the network is private (`metrics.unsecured`); the settings loader refuses the
rest. The token is compared in constant time.

The API wrapper is a separate process with figures of its own (stages of each request, uploads,
webhooks). It serves them at `/metrics` on its loopback port; at each scrape this listener reads
them (with a short timeout) and appends them to the daemon's, so Prometheus has one target per
worker. `comfy_worker_wrapper_metrics_up` says whether that read worked (a wrapper without
`/metrics`, such as the ai-dock one, reads 0 and the rest is still served).
"""

from __future__ import annotations

import asyncio
import hmac
import logging

import aiohttp
from aiohttp import web

from supervisor.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

WRAPPER_READ_TIMEOUT = 2.0


class MetricsServer:
    def __init__(self, metrics: WorkerMetrics, *, wrapper_url: str | None, token: str = "",
                 close_timeout: float = 1.0):
        self.close_timeout = close_timeout
        self.metrics = metrics
        self.wrapper_url = wrapper_url.rstrip("/") if wrapper_url else None
        self.token = token
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._wrapper_failure: str | None = None

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics_route)
        return app

    async def start(self, host: str, port: int) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=WRAPPER_READ_TIMEOUT))
        self._runner = web.AppRunner(self.build_app(), access_log=None,
                                    shutdown_timeout=self.close_timeout)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        logger.info("metrics on http://%s:%d/metrics (%s)", host, port,
                    "bearer token required" if self.token else "no token")

    async def close(self) -> None:
        if self._runner:
            await self._runner.cleanup()
        if self._session:
            await self._session.close()

    def _authorised(self, request: web.Request) -> bool:
        if not self.token:
            return True
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {self.token}"
        return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())

    async def metrics_route(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.json_response({"error": "/metrics needs the metrics token: "
                                               "Authorization: Bearer <metrics.token>"},
                                     status=401, headers={"WWW-Authenticate": "Bearer"})
        wrapper = await self._wrapper_text()
        self.metrics.wrapper_metrics_up.set(1 if wrapper is not None else 0)
        payload, content_type = self.metrics.render()
        if wrapper:
            payload += wrapper if wrapper.endswith(b"\n") else wrapper + b"\n"
        return web.Response(body=payload, headers={"Content-Type": content_type})

    async def _wrapper_text(self) -> bytes | None:
        if not self.wrapper_url or self._session is None:
            return None
        try:
            async with self._session.get(f"{self.wrapper_url}/metrics") as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                text = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            failure = f"{exc.__class__.__name__} {exc}".strip()
            if failure != self._wrapper_failure:  # once per distinct failure, not per scrape
                logger.info("the wrapper's /metrics could not be read (%s); serving the "
                            "daemon's figures only", failure)
                self._wrapper_failure = failure
            return None
        self._wrapper_failure = None
        return text
