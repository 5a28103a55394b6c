"""The daemon's three listeners, each a start and a stop: the public port, the admin socket and
the metrics listener.

The public port failing to bind stops the start (the worker is of no use without it); the admin
socket and the metrics listener failing are logged and the worker serves on without them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from functools import partial
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from api.contract.http import SERVER_OPTIONS
from api.contract.modifiers import registry_from_settings
from api.contract.openapi import public_document
from api.host.ports import describe_bind_error
from config import Settings
from supervisor.daemon.admin_actions import Action
from supervisor.daemon.errors import DaemonStartError
from supervisor.daemon.fleet import Fleet
from supervisor.reporting.admin import AdminServer
from supervisor.reporting.metrics import WorkerMetrics
from supervisor.reporting.metrics_server import MetricsServer
from supervisor.serving.gates import Gate
from supervisor.serving.public import PublicServer, RequestHooks, WaitLimit
from supervisor.state import WorkerStateTracker

logger = logging.getLogger(__name__)


def public_api_document(settings: Settings, auth: str,
                        required_auth_fields: tuple[str, ...] | None) -> dict[str, Any]:
    """The public port's OpenAPI document, built on each GET /openapi.json (in a thread): the
    modifier files are read as the wrapper reads them, so an operator's own are listed too."""
    return public_document(registry_from_settings(settings), auth,
                           docs_public=settings.worker.docs_public,
                           required_auth_fields=required_auth_fields)


def tls_files(settings: Settings) -> tuple[tuple[Path, str], tuple[Path, str]] | None:
    """The certificate and key the public port serves with USE_SSL, each with the settings that
    name it (None without TLS). Behind the autoscaler an unset worker.ssl_cert/ssl_key is the
    certificate Vast installs on the instance (autoscaler.instance_cert/instance_key)."""
    w, a = settings.worker, settings.autoscaler
    if not w.use_ssl:
        return None
    behind = bool(a.report_addr)
    pairs = []
    for kind, own, instance in (("cert", w.ssl_cert, a.instance_cert),
                                ("key", w.ssl_key, a.instance_key)):
        ours = f"worker.ssl_{kind} (WORKER_SSL_{kind.upper()})"
        if own or not behind:
            pairs.append((Path(own), ours))
        else:
            pairs.append((Path(instance), f"autoscaler.instance_{kind} "
                          f"(AUTOSCALER_INSTANCE_{kind.upper()}), or {ours}"))
    return pairs[0], pairs[1]


def load_tls(settings: Settings) -> ssl.SSLContext | None:
    """The public port's TLS context; DaemonStartError names a missing or unusable file and the
    settings that choose it."""
    files = tls_files(settings)
    if files is None:
        return None
    (cert, cert_names), (key, key_names) = files
    for what, path, names in (("certificate", cert, cert_names), ("private key", key, key_names)):
        if not path.is_file():
            raise DaemonStartError(
                f"USE_SSL is true but the TLS {what} {path} does not exist: set {names} to "
                "its path, or USE_SSL=false to serve plain HTTP")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise DaemonStartError(f"USE_SSL is true but the TLS certificate {cert} and key {key} "
                               f"cannot be used ({exc}); set {cert_names} and {key_names}") \
            from None
    return context


class PublicPort:
    """`/generate/sync`, `/health`, `/health/live` and the docs on worker.host:worker.port."""

    def __init__(self, settings: Settings, *, tracker: WorkerStateTracker, gate: Gate,
                 fleet: Fleet, metrics: WorkerMetrics, hooks: RequestHooks,
                 snapshot: Callable[[], dict[str, Any]],
                 liveness: Callable[[], tuple[bool, str]],
                 required_auth_fields: tuple[str, ...] | None, close_timeout: float,
                 wait_limit: WaitLimit | None = None, routes: list[web.RouteDef] | None = None):
        s = settings
        self.settings = settings
        self.close_timeout = close_timeout
        self.server = PublicServer(
            tracker=tracker, gate=gate, router=fleet.router, metrics=metrics,
            max_waiting=s.worker.queue_size, max_json_depth=s.worker.max_json_depth,
            request_timeout=s.api.request_timeout, liveness=liveness, snapshot=snapshot,
            hooks=hooks, document=partial(public_api_document, s, gate.name,
                                          required_auth_fields),
            docs_public=s.worker.docs_public, wait_limit=wait_limit, routes=routes or ())
        self._ssl: ssl.SSLContext | None = None
        self._runner: web.AppRunner | None = None

    async def load_tls(self) -> None:
        """Read the TLS files before the children start: a missing one stops the start."""
        self._ssl = await asyncio.to_thread(load_tls, self.settings)

    async def start(self) -> None:
        w = self.settings.worker
        app = self.server.build_app(w.max_body_bytes)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=self.close_timeout, **SERVER_OPTIONS)
        await self._runner.setup()
        ssl_context = self._ssl
        try:
            await web.TCPSite(self._runner, w.host, w.port, ssl_context=ssl_context).start()
        except OSError as exc:
            reason = await asyncio.to_thread(describe_bind_error, w.port, exc)
            logger.error("public port (worker.port): %s", reason)
            raise DaemonStartError(f"public port (worker.port): {reason}") from None
        logger.info("public server on %s://%s:%d", "https" if ssl_context else "http",
                    w.host, w.port)

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()


class AdminPort:
    """The admin socket; without it `comfy-worker health` reads only what it sees directly."""

    def __init__(self, path: Path, *, snapshot: Callable[[], dict[str, Any]],
                 actions: dict[str, Action]):
        self.path = path
        self.server: AdminServer | None = AdminServer(path, snapshot=snapshot, actions=actions)

    async def start(self) -> None:
        assert self.server is not None
        try:
            await self.server.start()
        except OSError as exc:
            logger.error("admin socket %s unavailable (%s); `comfy-worker health` will read "
                         "only what it can see directly", self.path, exc)
            self.server = None

    async def stop(self) -> None:
        if self.server:
            await self.server.close()


class MetricsPort:
    """The metrics listener (metrics.port); serving goes on without it."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics, fleet: Fleet, *,
                 close_timeout: float):
        self.settings = settings
        self.metrics = metrics
        self.fleet = fleet
        self.close_timeout = close_timeout
        self.server: MetricsServer | None = None

    async def start(self) -> None:
        m = self.settings.metrics
        instances = self.fleet.instances
        wrappers = [(i.wrapper_url, {"comfy_instance": str(i.number),
                                     "gpu": "" if i.plan.gpu.index is None
                                     else str(i.plan.gpu.index)}) for i in instances]
        self.server = MetricsServer(self.metrics, wrapper_url=instances[0].wrapper_url,
                                    wrappers=wrappers, token=m.token,
                                    close_timeout=self.close_timeout)
        try:
            await self.server.start(m.host, m.port)
        except OSError as exc:
            # Serving goes on without figures; Prometheus' `up` shows the gap.
            logger.error("metrics listener %s:%d unavailable (%s); set metrics.port "
                         "(METRICS_PORT) to a free port, or 0 to turn it off",
                         m.host, m.port, exc)

    async def stop(self) -> None:
        if self.server:
            await self.server.close()
