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
`/metrics`, such as the ai-dock one, reads 0 and the rest is still served). A multi-GPU host runs a
wrapper per instance: each one's figures are read, labelled with `comfy_instance` and `gpu`, and
merged into one family per name (`wrappers`); with one instance the text is passed on as it is.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from supervisor.reporting.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

WRAPPER_READ_TIMEOUT = 2.0


class MetricsServer:
    def __init__(self, metrics: WorkerMetrics, *, wrapper_url: str | None, token: str = "",
                 close_timeout: float = 1.0,
                 wrappers: list[tuple[str, dict[str, str]]] | None = None):
        self.close_timeout = close_timeout
        #: Several instances: each wrapper's URL and the labels its figures get.
        self.wrappers = wrappers if wrappers and len(wrappers) > 1 else None
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
        if self.wrappers:
            wrapper = await self._merged_wrappers()
        else:
            wrapper = await self._wrapper_text()
        self.metrics.wrapper_metrics_up.set(1 if wrapper is not None else 0)
        payload, content_type = self.metrics.render()
        if wrapper:
            payload += wrapper if wrapper.endswith(b"\n") else wrapper + b"\n"
        return web.Response(body=payload, headers={"Content-Type": content_type})

    async def _merged_wrappers(self) -> bytes | None:
        """Every instance's wrapper figures, labelled and merged; None unless all were read."""
        assert self.wrappers is not None
        texts = await asyncio.gather(*(self._wrapper_text(url) for url, _ in self.wrappers))
        if any(text is None for text in texts):
            return None
        return await asyncio.to_thread(merge_labelled, [
            (text.decode("utf-8", "replace"), labels)
            for text, (_, labels) in zip(texts, self.wrappers) if text is not None])

    async def _wrapper_text(self, url: str | None = None) -> bytes | None:
        url = url or self.wrapper_url
        if not url or self._session is None:
            return None
        try:
            async with self._session.get(f"{url}/metrics") as response:
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


def merge_labelled(texts: list[tuple[str, dict[str, str]]]) -> bytes:
    """Prometheus texts from several processes as one: each sample gets its process's labels,
    the families of the same name become one."""
    merged: dict[str, Any] = {}
    for text, labels in texts:
        for family in text_string_to_metric_families(text):
            samples = [Sample(s.name, {**s.labels, **labels}, s.value, s.timestamp, s.exemplar)
                       for s in family.samples]
            into = merged.setdefault(family.name, family)
            if into is family:
                family.samples = samples
            else:
                into.samples += samples

    class _Collector:
        def collect(self):
            return list(merged.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry)
