"""The daemon's link to a Vast-style autoscaler: signature checks on the way in (the public
port's gate), status reports and finished requests on the way out."""

from __future__ import annotations

import logging
from typing import Any, Callable

import aiohttp
from aiohttp import web

from config import Settings
from supervisor.autoscaler.auth import REQUIRED_AUTH_FIELDS, ReplayGuard, RequestAuthenticator
from supervisor.autoscaler.env import AutoscalerEnv
from supervisor.autoscaler.errors import AuthError
from supervisor.autoscaler.pubkey import PublicKeyFetcher
from supervisor.autoscaler.reporter import StatusReporter
from supervisor.serving.gates import Admitted, Rejected, split_body
from supervisor.serving.public import RequestHooks
from supervisor.state import Readiness, WorkerState

logger = logging.getLogger(__name__)


class AutoscalerLink:
    """The Vast-style autoscaler: signature checks on the way in, status reports on the way out."""

    required_auth_fields = REQUIRED_AUTH_FIELDS

    def __init__(self, env: AutoscalerEnv, settings: Settings):
        self.env = env
        self.settings = settings
        self.fetcher: PublicKeyFetcher | None = None
        self.reporter: StatusReporter | None = None
        self.session: aiohttp.ClientSession | None = None
        self._readiness: Callable[[], Readiness] | None = None
        self.authenticator = RequestAuthenticator(
            self, legacy=settings.autoscaler.legacy_signatures,
            unsecured=settings.worker.unsecured,
            replay_guard=ReplayGuard(window=settings.autoscaler.replay_window),
            # The signature covers only the URL: binding it to our own public URL is what stops
            # a request signed for another worker from being replayed here.
            expected_url=env.public_url if settings.autoscaler.check_url else None)

    @property
    def key(self):  # KeySource for the authenticator: None until the fetcher has the key
        return self.fetcher.key if self.fetcher else None

    async def start(self, readiness: Callable[[], Readiness]) -> None:
        """Fetch the key and report in the background; `readiness` is asked at each change."""
        self._readiness = readiness
        self.session = aiohttp.ClientSession()
        self.fetcher = PublicKeyFetcher(self.env.report_addrs, self.session)
        self.fetcher.start()
        self.reporter = StatusReporter(self.env, self.session,
                                       interval=self.settings.autoscaler.report_interval,
                                       min_interval=min(1.0,
                                                        self.settings.autoscaler.report_interval))
        self.reporter.start()
        self.state_changed()

    async def stop(self) -> None:
        if self.reporter:
            await self.reporter.stop()
        if self.fetcher:
            await self.fetcher.stop()
        if self.session:
            await self.session.close()

    def state_changed(self) -> None:
        if not self.reporter or self._readiness is None:
            return
        now = self._readiness()
        # Loading (starting, benchmarking) is normal and carries no error; only a worker that
        # cannot serve says why, so the autoscaler does not write off a node that is warming up.
        # max_perf is the sum over the instances that serve: one worker, N GPUs' worth of work.
        failing = now.state is WorkerState.UNHEALTHY
        self.reporter.set_state(ready=now.state.serving, error_msg=now.reason if failing else "",
                                max_perf=now.max_perf, loadtime=now.loadtime)

    def hooks(self) -> RequestHooks:
        def received(admitted: Admitted) -> None:
            if self.reporter and admitted.request_idx is not None:
                self.reporter.request_received(admitted.request_idx, admitted.cost)

        def started(admitted: Admitted) -> None:
            if self.reporter and admitted.request_idx is not None:
                self.reporter.request_started(admitted.request_idx)

        def finished(admitted: Admitted, status: int, entered: float, began: float, ended: float) -> None:
            if self.reporter and admitted.request_idx is not None:
                outcome = "Success" if status == 200 else ("Cancelled" if status == 499
                                                           else "Error")
                self.reporter.request_finished(admitted.request_idx, status == 200, outcome,
                                               entered, began, ended)

        def rejected(admitted: Admitted | None) -> None:
            if self.reporter:
                self.reporter.request_rejected(
                    admitted.cost if admitted else 1.0,
                    admitted.request_idx if admitted else None)

        return RequestHooks(received=received, started=started, finished=finished,
                            rejected=rejected)

    def gate(self) -> "AutoscalerGate":
        """The public port's door in autoscaler mode: the signature on every request."""
        return AutoscalerGate(self.authenticator)


class AutoscalerGate:
    """Behind the autoscaler: every request carries auth_data signed with its key."""

    name = "autoscaler"

    def __init__(self, authenticator: RequestAuthenticator):
        self._authenticator = authenticator

    def admit(self, request: web.Request, body: Any) -> Admitted:
        auth_data, payload = split_body(body)
        try:
            verified = self._authenticator.authenticate(auth_data)
        except AuthError as exc:
            reason = exc.reason
            if auth_data is None:
                reason += (": this worker takes requests routed by the autoscaler, sent as "
                           "{\"auth_data\": ..., \"payload\": {\"input\": ...}}")
            raise Rejected(exc.status, reason) from None
        request_idx = getattr(verified, "request_idx", None)
        cost = getattr(verified, "cost", None) or 1.0
        return Admitted(payload, request_idx=request_idx, cost=float(cost))
