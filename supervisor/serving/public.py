"""The public port: `/generate/sync` while healthy, readiness and liveness.

`/metrics` is not here: it has a listener of its own (`supervisor.reporting.metrics_server`), so that a
request client cannot read the fleet's internals.

Work is forwarded, in arrival order, to the wrapper of an instance with room
(`supervisor.serving.routing`); the answer says which instance and GPU served it (`served_by`, and the
X-Worker-Instance / X-Worker-GPU headers). While the worker is not serving, requests get 503 with
the state, the reason and Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import aiohttp
from aiohttp import web

from api.contract.docs import DocumentFactory, add_doc_routes
from api.contract.http import error_middleware, expect_handler
from api.contract.http import json_response as _json
from api.contract.request import RequestInvalid, parse_json_body
from supervisor.reporting.metrics import WorkerMetrics
from supervisor.instances.instance import Instance
from supervisor.serving.gates import Admitted, Gate, Rejected, TokenGate
from supervisor.serving.routing import Aborted, NotServing, Router
from supervisor.state import WorkerStateTracker

logger = logging.getLogger(__name__)

_PASS_HEADERS = ("X-Return-Outputs-As-Base64", "X-Include-ComfyUI-Response")

#: The status a request gets when its client went away before the answer (nginx's, and the
#: vastai SDK's, "client closed request"); nobody reads it but the accounting.
CLIENT_GONE = 499


@dataclass
class RequestHooks:
    """Callbacks for the autoscaler reporter; each is optional and must not raise.

    Every request that passed the door ends in exactly one of `finished` (it was accepted:
    `received`, then `started` once handed to an instance) and `rejected` (refused before any
    work: a bad signature, not serving, queue full, an estimated wait too long). `finished`
    gets the HTTP status (499: the client went away) and the epoch times it entered the queue,
    began and ended; `rejected` the refused request as far as it was read (None when its
    auth_data could not be read), the HTTP status and the time it arrived."""

    received: Callable[[Admitted], None] | None = None
    started: Callable[[Admitted], None] | None = None
    finished: Callable[[Admitted, int, float, float, float], None] | None = None
    rejected: Callable[[Admitted | None, int, float], None] | None = None


@dataclass(frozen=True)
class WaitLimit:
    """Refuse a request (429, Retry-After) whose estimated wait is longer than `max_seconds`;
    `estimate()` is the wait in seconds a new request would have now (None: not known)."""

    max_seconds: float
    estimate: Callable[[], float | None]


class PublicServer:
    def __init__(self, *, tracker: WorkerStateTracker, gate: Gate, metrics: WorkerMetrics,
                 max_waiting: int, max_json_depth: int,
                 request_timeout: float, liveness: Callable[[], tuple[bool, str]],
                 snapshot: Callable[[], dict[str, Any]], hooks: RequestHooks | None = None,
                 router: Router | None = None,
                 retry_after: int = 10, document: DocumentFactory | None = None,
                 docs_public: bool = False, wait_limit: WaitLimit | None = None,
                 routes: Sequence[web.RouteDef] = ()):
        self.tracker = tracker
        self.gate = gate
        self.metrics = metrics
        self.router = router or Router(max_waiting)
        self.max_json_depth = max_json_depth
        self.request_timeout = request_timeout
        self.liveness = liveness
        self.snapshot = snapshot
        self.hooks = hooks or RequestHooks()
        self.retry_after = retry_after
        self.document = document
        self.docs_public = docs_public
        self.wait_limit = wait_limit
        self.routes = tuple(routes)
        self.session: aiohttp.ClientSession | None = None

    def build_app(self, max_body_bytes: int) -> web.Application:
        app = web.Application(client_max_size=max_body_bytes,
                              middlewares=[error_middleware("worker", "worker.max_body_bytes")])
        app.router.add_post("/generate/sync", self.generate_sync, expect_handler=expect_handler)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health/live", self.live)
        app.router.add_routes(self.routes)
        if self.document is not None:
            add_doc_routes(app, self.document, title="comfy-worker", guard=self._docs_guard)
        app.cleanup_ctx.append(self._session_ctx)
        return app

    def _docs_guard(self, request: web.Request) -> web.Response | None:
        """The docs need what the work needs, unless worker.docs_public says otherwise."""
        if self.docs_public or self.gate.name == "unsecured":
            return None
        if isinstance(self.gate, TokenGate):
            try:
                self.gate.check(request)
            except Rejected as exc:
                return _json({"error": f"{exc.reason} (or set worker.docs_public = true to "
                                       "serve the docs without it)"}, exc.status)
            return None
        return _json({"error": "behind the autoscaler the API docs are served only when "
                               "worker.docs_public is true"}, 401)

    async def _session_ctx(self, app: web.Application):
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        yield
        await self.session.close()

    # --- work -----------------------------------------------------------------------------------
    def _unavailable(self) -> web.Response:
        state = self.tracker.state
        return _json({"error": "worker not ready", "state": state.value,
                      "reason": self.tracker.reason}, 503,
                     {"Retry-After": str(self.retry_after)})

    async def generate_sync(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        status = 500
        try:
            response = await self._generate(request)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = CLIENT_GONE
            raise
        finally:
            self.metrics.requests.labels(str(status)).inc()
            self.metrics.duration.observe(time.monotonic() - arrived)

    def _refuse(self, refused: Admitted | None, response: web.Response,
                entered: float) -> web.Response:
        if self.hooks.rejected:
            self.hooks.rejected(refused, response.status, entered)
        return response

    def _too_long(self) -> web.Response | None:
        """429 when the estimated wait is longer than the limit (None: it may queue)."""
        limit = self.wait_limit
        if limit is None or limit.max_seconds <= 0:
            return None
        wait = limit.estimate()
        if wait is None or wait <= limit.max_seconds:
            return None
        retry = max(1, math.ceil(wait - limit.max_seconds))
        return _json({"error": f"estimated wait {wait:.1f} s is longer than max_queue_time "
                               f"{limit.max_seconds:g} s; retry later",
                      "estimated_wait_s": round(wait, 1), "state": self.tracker.state.value,
                      "reason": "busy"}, 429, {"Retry-After": str(retry)})

    async def _generate(self, request: web.Request) -> web.Response:
        entered = time.time()
        try:
            body = parse_json_body(await request.read(), self.max_json_depth)
        except RequestInvalid as exc:
            return _json(exc.body(), 400)
        try:
            admitted = self.gate.admit(request, body)
        except Rejected as exc:
            response = _json({"error": exc.reason}, exc.status)
            return self._refuse(exc.refused, response, entered) if exc.refused else response
        if not isinstance(admitted.payload, dict) or "input" not in admitted.payload:
            return _json({"error": "invalid request: 1 problem",
                          "errors": {"input": "missing; the body must be {\"input\": {...}}"}},
                         400)
        if not self.tracker.state.serving:
            return self._refuse(admitted, self._unavailable(), entered)
        if self.router.full():
            return self._refuse(admitted, _json(
                {"error": f"queue full ({self.router.max_waiting} waiting); retry later",
                 "state": self.tracker.state.value, "reason": "busy"}, 503,
                {"Retry-After": str(self.retry_after)}), entered)
        too_long = self._too_long()
        if too_long is not None:
            return self._refuse(admitted, too_long, entered)
        if self.hooks.received:
            self.hooks.received(admitted)

        headers = {h: request.headers[h] for h in _PASS_HEADERS if h in request.headers}
        started_at = [0.0]

        def on_start() -> None:
            started_at[0] = time.time()
            self.metrics.in_flight.set(self.router.in_flight)
            self.metrics.queue_depth.set(self.router.waiting)
            if self.hooks.started:
                self.hooks.started(admitted)

        self.metrics.queue_depth.set(self.router.waiting + 1)
        status = 502
        try:
            async def work(instance: Instance) -> web.Response:
                return await self._forward(instance, admitted.payload, headers)

            # The router waits out a restart, and turns the request away when nothing serves.
            response = await self.router.run(work, on_start, _request_id(admitted.payload))
            status = response.status
            return response
        except NotServing:
            status = 503
            return self._unavailable()
        except Aborted as exc:
            return _json({"error": str(exc), "status": "failed"}, 502)
        except asyncio.CancelledError:
            status = CLIENT_GONE
            raise
        finally:
            self.metrics.in_flight.set(self.router.in_flight)
            self.metrics.queue_depth.set(self.router.waiting)
            if self.hooks.finished:
                self.hooks.finished(admitted, status, entered, started_at[0] or entered,
                                    time.time())

    async def _forward(self, instance: Instance, payload: dict[str, Any], headers: dict[str, str]
                       ) -> web.Response:
        assert self.session is not None
        try:
            async with self.session.post(
                    f"{instance.wrapper_url}/generate/sync", json=payload, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.request_timeout + 120,
                                                  sock_connect=5)) as upstream:
                data = await upstream.read()
                if upstream.status == 200:
                    instance.served += 1
                gpu = instance.plan.gpu
                served = {"X-Worker-Instance": str(instance.number)}
                if gpu.index is not None:
                    served["X-Worker-GPU"] = f"{gpu.index} {gpu.uuid}"
                return web.Response(
                    body=_with_served_by(data, upstream.content_type, instance),
                    status=upstream.status,
                    content_type=upstream.content_type or "application/json",
                    headers={**_retry_after(upstream), **served})
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return _json({"error": f"the API wrapper did not answer: {exc.__class__.__name__} "
                                   f"{exc}".strip(), "status": "failed"}, 502)

    # --- health ---------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        snapshot = self.snapshot()
        state = self.tracker.state
        body = {"state": state.value, "reason": self.tracker.reason,
                "since": self.tracker.since, **snapshot}
        if state.serving:
            return _json(body, 200)
        return _json(body, 503, {"Retry-After": str(self.retry_after)})

    async def live(self, request: web.Request) -> web.Response:
        alive, reason = self.liveness()
        return _json({"alive": alive, "reason": reason}, 200 if alive else 503)


def _request_id(payload: dict[str, Any]) -> str:
    """The request's id, made here (a UUID4, as the wrapper would) when the client sent none, so
    the daemon can tell the wrapper's requests apart."""
    body = payload.get("input")
    if not isinstance(body, dict):
        return ""
    rid = body.get("request_id")
    if rid in (None, ""):
        rid = body["request_id"] = str(uuid.uuid4())
    return str(rid)


def _with_served_by(data: bytes, content_type: str, instance: Instance) -> bytes:
    """The wrapper's JSON answer with `served_by` (instance and GPU) as its first field.

    Spliced in as bytes: an answer can carry megabytes of base64 that need not be parsed again."""
    head = data.lstrip()
    if content_type != "application/json" or not head.startswith(b"{"):
        return data
    gpu = instance.plan.gpu
    served = json.dumps({"instance": instance.number, "gpu_index": gpu.index,
                         "gpu_uuid": gpu.uuid, "gpu_name": gpu.name}).encode()
    rest = head[1:]
    joiner = b"" if rest.lstrip().startswith(b"}") else b", "
    return b'{"served_by": ' + served + joiner + rest


def _retry_after(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    value = upstream.headers.get("Retry-After")
    return {"Retry-After": value} if value else {}

