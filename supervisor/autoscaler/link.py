"""The daemon's link to a Vast-style autoscaler: signature checks on the way in (the public
port's gate), status reports and finished requests on the way out, sessions and updates.

What it tells the autoscaler, as the vastai SDK 1.9.1's worker does:

* **One workload unit**: each request is `autoscaler.workload` (100, the SDK's
  `DEFAULT_WORKLOAD`); every load field and `max_perf` are in it. `max_perf` is the benchmark's
  requests per second x the workload, summed over the instances that serve now.
* **Ready** (`loadtime`, `max_perf` non-zero) only once a signed request can be verified (the
  public key is fetched, or UNSECURED) and the worker serves; `loadtime` (seconds from start)
  is then in every report.
* **`error_msg` only for what will not heal** (`Readiness.fatal`, or a failed start): the SDK's
  autoscaler treats it as fatal and recycles the worker, so a restart, a hot GPU or a download
  is never reported there. Once set it stays, as in the SDK.
* **Every request once**: Success (2xx), Error (another answer), Cancelled (the client left:
  499, `success` true), Rejected (a bad signature, not serving, queue full, estimated wait).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Callable

import aiohttp
from aiohttp import web

from config import Settings
from supervisor.autoscaler.auth import REQUIRED_AUTH_FIELDS, ReplayGuard, RequestAuthenticator
from supervisor.autoscaler.env import AutoscalerEnv
from supervisor.autoscaler.errors import AuthError
from supervisor.autoscaler.pubkey import PublicKeyFetcher
from supervisor.autoscaler.reporter import RequestOutcome, StatusReporter
from supervisor.autoscaler.sessions import Session, Sessions
from supervisor.autoscaler.worker_routes import WorkerRoutes
from supervisor.serving.gates import Admitted, Rejected, split_body
from supervisor.serving.public import CLIENT_GONE, RequestHooks
from supervisor.state import Readiness

logger = logging.getLogger(__name__)

#: How long a session's on_close_route may take (the SDK's figure).
ON_CLOSE_TIMEOUT = 10.0


def outcome(status: int) -> RequestOutcome:
    """A finished request's status for /delete_requests/ from its HTTP status."""
    if 200 <= status < 300:
        return RequestOutcome.SUCCESS
    if status == CLIENT_GONE:
        return RequestOutcome.CANCELLED
    return RequestOutcome.ERROR


class AutoscalerLink:
    """The Vast-style autoscaler: signature checks on the way in, status reports on the way out."""

    required_auth_fields = REQUIRED_AUTH_FIELDS

    def __init__(self, env: AutoscalerEnv, settings: Settings):
        self.env = env
        self.settings = settings
        self.workload = settings.autoscaler.workload
        self.fetcher: PublicKeyFetcher | None = None
        self.reporter: StatusReporter | None = None
        self.session: aiohttp.ClientSession | None = None
        #: Asked for at POST /pyworker/update (the daemon drains and exits to be restarted).
        self.on_update: Callable[[], None] = lambda: None
        #: Where a session's on_close_route goes: the model server (the first wrapper).
        self.model_server: Callable[[], str | None] = lambda: None
        self._readiness: Callable[[], Readiness] | None = None
        self._ready_at: float | None = None
        self._loadtime = 0.0
        self._error = ""
        self.authenticator = RequestAuthenticator(
            self, legacy=settings.autoscaler.legacy_signatures,
            unsecured=settings.worker.unsecured,
            replay_guard=ReplayGuard(window=settings.autoscaler.replay_window),
            # The signature covers only the URL: binding it to our own public URL is what stops
            # a request signed for another worker from being replayed here.
            expected_url=env.public_url if settings.autoscaler.check_url else None)
        self.sessions = Sessions(settings.autoscaler.max_sessions, on_open=self._session_opened,
                                 on_close=self._session_closed, on_close_call=self._on_close)

    @property
    def key(self):  # KeySource for the authenticator: None until the fetcher has the key
        return self.fetcher.key if self.fetcher else None

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self, readiness: Callable[[], Readiness],
                    disk_used: Callable[[], float | None] | None = None) -> None:
        """Fetch the key and report in the background; `readiness` is asked at each change,
        `disk_used` (the disk guard's used GiB of /) at each report."""
        self._readiness = readiness
        self.session = aiohttp.ClientSession()
        self.fetcher = PublicKeyFetcher(self.env.report_addrs, self.session,
                                        on_key=self.state_changed)
        self.fetcher.start()
        self.reporter = StatusReporter(self.env, self.session,
                                       interval=self.settings.autoscaler.report_interval,
                                       min_interval=min(1.0,
                                                        self.settings.autoscaler.report_interval),
                                       disk_used=disk_used)
        self.reporter.start()
        self.sessions.start()
        self.state_changed()

    async def stop(self) -> None:
        await self.sessions.stop()
        if self.reporter:
            await self.reporter.stop()
        if self.fetcher:
            await self.fetcher.stop()
        if self.session:
            await self.session.close()

    # --- what the worker can do -----------------------------------------------------------------
    @property
    def verifies(self) -> bool:
        """A signed request can be checked now (the key is here, or nothing is checked)."""
        return self.authenticator.unsecured or self.key is not None

    def state_changed(self) -> None:
        if not self.reporter or self._readiness is None:
            return
        now = self._readiness()
        if self._ready_at is None and now.state.serving and self.verifies:
            self._ready_at = time.time()
            self._loadtime = self._ready_at - now.started_at
            logger.info("ready for the autoscaler after %.1f s", self._loadtime)
        if now.fatal and now.fatal != self._error:
            logger.error("reporting to the autoscaler that this worker will not recover: %s",
                         now.fatal)
            self._error = now.fatal
        # One worker, N GPUs' worth of work: the sum over the instances that serve now.
        max_perf = (now.max_perf or 0.0) * self.workload if self._ready_at is not None else 0.0
        self.reporter.set_state(loadtime=self._loadtime, max_perf=max_perf,
                                error_msg=self._error)

    def start_failed(self, reason: str) -> None:
        """The worker could not start: the last report says why (the SDK's start-up beacon)."""
        self._error = f"the worker failed to start: {reason}"
        if self.reporter:
            self.reporter.set_state(loadtime=self._loadtime, max_perf=0.0,
                                    error_msg=self._error)

    # --- requests -------------------------------------------------------------------------------
    def hooks(self) -> RequestHooks:
        def received(admitted: Admitted) -> None:
            if not self.reporter:
                return
            if admitted.session is not None:
                self.reporter.session_request(self.workload)
            elif admitted.request_idx is not None:
                self.reporter.request_received(admitted.request_idx, self.workload)

        def started(admitted: Admitted) -> None:
            if self.reporter and admitted.request_idx is not None and admitted.session is None:
                self.reporter.request_started(admitted.request_idx)

        def finished(admitted: Admitted, status: int, entered: float, began: float,
                     ended: float) -> None:
            self._leave_session(admitted)
            if not self.reporter:
                return
            result = outcome(status)
            if admitted.session is not None:
                self.reporter.session_request_done(self.workload, result)
            elif admitted.request_idx is not None:
                self.reporter.request_finished(
                    admitted.request_idx, result is not RequestOutcome.ERROR, result,
                    entered, began, ended)

        def rejected(admitted: Admitted | None, status: int, entered: float) -> None:
            if admitted is not None:
                self._leave_session(admitted)
            if not self.reporter:
                return
            if admitted is not None and admitted.session is not None:
                self.reporter.session_request_rejected(self.workload)
            else:
                self.reporter.request_rejected(
                    self.workload, admitted.request_idx if admitted else None, entered)

        return RequestHooks(received=received, started=started, finished=finished,
                            rejected=rejected)

    def gate(self) -> "AutoscalerGate":
        """The public port's door in autoscaler mode: the signature on every request."""
        return AutoscalerGate(self.authenticator, self.sessions)

    def routes(self) -> list[web.RouteDef]:
        """/session/create|end|get|health and /pyworker/update, on the public port."""
        def rejected(request_idx: int | None) -> None:
            if self.reporter:
                self.reporter.request_rejected(self.workload, request_idx)

        return WorkerRoutes(self.sessions, self.authenticator,
                            master_token=self.env.master_token, rejected=rejected,
                            update=lambda: self.on_update()).routes()

    # --- sessions -------------------------------------------------------------------------------
    def _leave_session(self, admitted: Admitted) -> None:
        if admitted.session is None:
            return
        session = self.sessions.get(admitted.session)
        task = asyncio.current_task()
        if session is not None and task is not None:
            session.requests.discard(task)

    def _session_opened(self, session: Session) -> None:
        if self.reporter:
            self.reporter.session_opened(session.request_idx, self.workload)

    def _session_closed(self, session: Session) -> None:
        if self.reporter:
            self.reporter.session_closed(session.request_idx)

    async def _on_close(self, session: Session) -> None:
        """POST the session's on_close_payload to on_close_route on the model server (best
        effort, as the SDK does); only a path is taken, never another host."""
        route, base = session.on_close_route or "", self.model_server()
        if not route.startswith("/") or route.startswith("//") or base is None or \
                self.session is None:
            logger.warning("session %s: on_close_route %r is not a path on the model server; "
                           "not called", session.session_id, route)
            return
        payload = session.on_close_payload
        body: dict[str, Any] = dict(payload) if isinstance(payload, dict) else \
            ({} if payload is None else {"payload": payload})
        body.setdefault("session_id", session.session_id)
        async with self.session.post(base + route, json=body, timeout=aiohttp.ClientTimeout(
                total=ON_CLOSE_TIMEOUT)) as response:
            if response.status >= 400:
                logger.info("session %s: on_close_route %s answered %d", session.session_id,
                            route, response.status)


class AutoscalerGate:
    """Behind the autoscaler: every request carries auth_data signed with its key."""

    name = "autoscaler"

    def __init__(self, authenticator: RequestAuthenticator, sessions: Sessions):
        self._authenticator = authenticator
        self._sessions = sessions

    def admit(self, request: web.Request, body: Any) -> Admitted:
        auth_data, payload = split_body(body)
        session = self._session(body)
        try:
            # A session's requests all carry the session's auth_data: not a replay.
            in_session = session is not None and auth_data == session.auth_data
            verified = self._authenticator.authenticate(auth_data, replay=not in_session)
        except AuthError as exc:
            reason = exc.reason
            if auth_data is None:
                reason += (": this worker takes requests routed by the autoscaler, sent as "
                           "{\"auth_data\": ..., \"payload\": {\"input\": ...}}")
            # Refused after reading its auth_data: reported Rejected, as the SDK does. A replay
            # is not a new request (its request_idx is another's), so it is not reported.
            refused = None
            if exc.auth is not None and exc.reason != "replayed request":
                refused = Admitted({}, request_idx=exc.auth.request_idx,
                                   session=session.session_id if session else None)
            raise Rejected(exc.status, reason, refused) from None
        if session is not None:
            self._sessions.extend(session)
            task = asyncio.current_task()
            if task is not None:
                session.requests.add(task)
        request_idx = getattr(verified, "request_idx", None)
        return Admitted(payload, request_idx=request_idx,
                        session=session.session_id if session else None)

    def _session(self, body: Any) -> Session | None:
        """The session a request names; 410 for one that is not open (checked first)."""
        session_id = body.get("session_id") if isinstance(body, dict) else None
        if session_id is None:
            return None
        session = self._sessions.get(str(session_id))
        if session is None:
            raise Rejected(410, "invalid session")
        return session


def with_ssl(env: AutoscalerEnv, use_ssl: bool) -> AutoscalerEnv:
    """The environment with the public URL's scheme as the worker really serves it."""
    return dataclasses.replace(env, use_ssl=use_ssl)
