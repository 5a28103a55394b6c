"""The public port: `/generate/sync` while healthy, readiness and liveness.

`/metrics` is not here: it has a listener of its own (`supervisor.metrics_server`), so that a
request client cannot read the fleet's internals.

Work is forwarded to the wrapper one request at a time, in arrival order (ComfyUI runs one prompt
at a time, so a second in-flight request would only wait inside the wrapper, out of our sight).
While the worker is not serving, requests get 503 with the state, the reason and Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
from aiohttp import web

from api.docs import DocumentFactory, add_doc_routes
from api.http import error_middleware, expect_handler
from api.http import json_response as _json
from api.request import RequestInvalid, parse_json_body
from supervisor.gates import Admitted, Gate, Rejected, TokenGate
from supervisor.metrics import WorkerMetrics
from supervisor.state import WorkerStateTracker

logger = logging.getLogger(__name__)

_PASS_HEADERS = ("X-Return-Outputs-As-Base64", "X-Include-ComfyUI-Response")


class Aborted(Exception):
    """The request in flight was failed from outside: ComfyUI died, or the worker is stopping."""


@dataclass
class RequestHooks:
    """Callbacks for the autoscaler reporter; each is optional and must not raise."""

    received: Callable[[Admitted], None] | None = None
    started: Callable[[Admitted], None] | None = None
    finished: Callable[[Admitted, int, float, float, float], None] | None = None
    rejected: Callable[[Admitted | None], None] | None = None


#: Longest an admitted request waits for a restarting child before it gets 503.
RESTART_HOLD_TIMEOUT = 60.0


class Dispatcher:
    """FIFO hand-off to the wrapper: `depth` requests in flight, `max_waiting` waiting here.

    ComfyUI runs one prompt at a time whatever we do; a depth of 2 lets the next request wait
    inside the wrapper (and ComfyUI's own queue) rather than here, so ComfyUI starts it the
    moment the current one ends instead of a round trip later.
    """

    def __init__(self, max_waiting: int, depth: int = 2):
        self.max_waiting = max_waiting
        self.depth = depth
        self._slots = asyncio.Semaphore(depth)   # FIFO: waiters are woken in arrival order
        self.waiting = 0
        self._in_flight: dict[asyncio.Future, str | None] = {}  # work -> abort reason
        self._ids: dict[asyncio.Future, str | None] = {}        # work -> its request id

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def busy(self) -> bool:
        return bool(self._in_flight)

    def full(self) -> bool:
        return self.in_flight >= self.depth and self.waiting >= self.max_waiting

    def abort_all(self, reason: str) -> bool:
        """Fail every request in flight now (ComfyUI died, the worker stops): each client gets
        a 502 at once. `reason` is the whole message the client reads."""
        aborted = False
        for work in list(self._in_flight):
            if not work.done():
                self._in_flight[work] = reason
                work.cancel()
                aborted = True
        return aborted

    def abort_running(self, reason: str, request_id: str | None, known: bool) -> bool:
        """Fail only the request ComfyUI was running when it died: the others in flight wait
        in the wrapper, which gives them to the new ComfyUI. With `known`, `request_id` is the
        one the wrapper says runs (None: none runs); else the oldest in flight is taken, as
        ComfyUI runs them in order."""
        for work, rid in self._ids.items():
            if work.done() or (known and rid != request_id):
                continue
            self._in_flight[work] = reason
            work.cancel()
            return True
        return False

    async def run(self, work: Callable[[], Any], on_start: Callable[[], None],
                  request_id: str | None = None) -> Any:
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        future = asyncio.ensure_future(work())
        self._in_flight[future] = None
        self._ids[future] = request_id
        try:
            on_start()
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                reason = self._in_flight.get(future)
                if reason is not None and future.cancelled():
                    raise Aborted(reason) from None
                future.cancel()  # our own client went away
                raise
        finally:
            del self._in_flight[future]
            del self._ids[future]
            self._slots.release()


class PublicServer:
    def __init__(self, *, tracker: WorkerStateTracker, gate: Gate, wrapper_url: str,
                 metrics: WorkerMetrics, max_waiting: int, max_json_depth: int,
                 request_timeout: float, liveness: Callable[[], tuple[bool, str]],
                 snapshot: Callable[[], dict[str, Any]], hooks: RequestHooks | None = None,
                 restarting: Callable[[], bool] = lambda: False,
                 retry_after: int = 10, document: DocumentFactory | None = None,
                 docs_public: bool = False):
        self.tracker = tracker
        self.gate = gate
        self.wrapper_url = wrapper_url.rstrip("/")
        self.metrics = metrics
        self.dispatcher = Dispatcher(max_waiting)
        self.max_json_depth = max_json_depth
        self.request_timeout = request_timeout
        self.liveness = liveness
        self.snapshot = snapshot
        self.hooks = hooks or RequestHooks()
        self.restarting = restarting
        self.retry_after = retry_after
        self.document = document
        self.docs_public = docs_public
        self.session: aiohttp.ClientSession | None = None

    def build_app(self, max_body_bytes: int) -> web.Application:
        app = web.Application(client_max_size=max_body_bytes,
                              middlewares=[error_middleware("worker", "worker.max_body_bytes")])
        app.router.add_post("/generate/sync", self.generate_sync, expect_handler=expect_handler)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health/live", self.live)
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
            response = await self._generate(request, arrived)
            status = response.status
            return response
        finally:
            self.metrics.requests.labels(str(status)).inc()
            self.metrics.duration.observe(time.monotonic() - arrived)

    async def _generate(self, request: web.Request, arrived: float) -> web.Response:
        try:
            body = parse_json_body(await request.read(), self.max_json_depth)
        except RequestInvalid as exc:
            return _json(exc.body(), 400)
        try:
            admitted = self.gate.admit(request, body)
        except Rejected as exc:
            return _json({"error": exc.reason}, exc.status)
        if not isinstance(admitted.payload, dict) or "input" not in admitted.payload:
            return _json({"error": "invalid request: 1 problem",
                          "errors": {"input": "missing; the body must be {\"input\": {...}}"}},
                         400)
        if self.hooks.received:
            self.hooks.received(admitted)
        if not self.tracker.state.serving:
            if self.hooks.rejected:
                self.hooks.rejected(admitted)
            return self._unavailable()
        if self.dispatcher.full():
            if self.hooks.rejected:
                self.hooks.rejected(admitted)
            return _json({"error": f"queue full ({self.dispatcher.max_waiting} waiting); "
                                   "retry later", "state": self.tracker.state.value,
                          "reason": "busy"}, 503, {"Retry-After": str(self.retry_after)})

        headers = {h: request.headers[h] for h in _PASS_HEADERS if h in request.headers}
        started_at = [0.0]

        def on_start() -> None:
            started_at[0] = time.time()
            self.metrics.in_flight.set(self.dispatcher.in_flight)
            self.metrics.queue_depth.set(self.dispatcher.waiting)
            if self.hooks.started:
                self.hooks.started(admitted)

        self.metrics.queue_depth.set(self.dispatcher.waiting + 1)
        entered = time.time()
        status = 502
        try:
            # Recheck after waiting: the worker may have turned unhealthy meanwhile.
            async def work() -> web.Response:
                # A child restarting (ComfyUI after a crash) is a pause, not a refusal: a
                # request already admitted waits it out, for a while, rather than fail.
                hold_until = time.monotonic() + RESTART_HOLD_TIMEOUT
                while not self.tracker.state.serving and self.restarting() and \
                        time.monotonic() < hold_until:
                    await asyncio.sleep(0.2)
                if not self.tracker.state.serving:
                    return self._unavailable()
                return await self._forward(admitted.payload, headers)

            response = await self.dispatcher.run(work, on_start, _request_id(admitted.payload))
            status = response.status
            return response
        except Aborted as exc:
            return _json({"error": str(exc), "status": "failed"}, 502)
        finally:
            self.metrics.in_flight.set(self.dispatcher.in_flight)
            self.metrics.queue_depth.set(self.dispatcher.waiting)
            if self.hooks.finished:
                self.hooks.finished(admitted, status, entered, started_at[0] or entered,
                                    time.time())

    async def _forward(self, payload: dict[str, Any], headers: dict[str, str]) -> web.Response:
        assert self.session is not None
        try:
            async with self.session.post(
                    f"{self.wrapper_url}/generate/sync", json=payload, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.request_timeout + 120,
                                                  sock_connect=5)) as upstream:
                data = await upstream.read()
                return web.Response(body=data, status=upstream.status,
                                    content_type=upstream.content_type or "application/json",
                                    headers=_retry_after(upstream))
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


def _retry_after(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    value = upstream.headers.get("Retry-After")
    return {"Retry-After": value} if value else {}

