"""Telling the autoscaler how loaded this worker is, and which requests it has finished.

Protocol facts (public vastai SDK, server library):

* ``POST {addr}/worker_status/`` with the fields of :class:`WorkerStatus`; each
  comma-separated ``REPORT_ADDR`` is tried in turn until one answers. The SDK checks every
  second and sends after request activity, else 10 s after the last delivered report
  (``vastai/serverless/server/lib/metrics.py`` ``_send_metrics_loop``).
* Load is measured in the worker's workload unit (the caller passes each request's workload:
  one unit, ``autoscaler.workload``, 100 by default as in the SDK's ``DEFAULT_WORKLOAD``).
  ``cur_load`` is the workload in flight (queued, running, and open sessions); ``new_load``
  the workload accepted since the last delivered report less what was cancelled; ``rej_load``
  the workload refused since then; ``cur_perf`` the workload served since then (a sum, not a
  rate); ``num_requests_recieved`` (sic) counts the requests received since start, each once,
  accepted or refused; ``loadtime`` is sent in every report once the worker is ready (0
  before); ``disk_usage`` is the root filesystem's used GiB and ``additional_disk_usage`` its
  change since the last delivered report; ``cur_capacity`` and ``max_capacity`` are 0.
* ``POST {addr}/delete_requests/`` with ``{"worker_id", "mtoken", "requests": [...]}`` tells
  it which ``request_idx`` are done, with ``success``, ``status`` ("Success", "Error",
  "Cancelled", "Rejected") and the three epoch timestamps.

Interval counters are only reset by what a *delivered* report carried, so nothing is lost while
the autoscaler is down; finished requests wait in a bounded queue until delivered. The
``request_*`` and :meth:`StatusReporter.set_state` methods only touch memory and never raise
for network reasons: every network call happens in the two background tasks, with timeouts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import aiohttp

from .disk import disk_used_gib
from .env import AutoscalerEnv
from .failures import FailureLog, wait_event

log = logging.getLogger(__name__)

# The report format of the vastai SDK server library release this module was checked against.
PROTOCOL_VERSION = "1.1.0"

# The SDK never posts finished requests to this address (it does not accept them); skipping it
# saves a doomed request per batch when a host lists it in REPORT_ADDR.
DELETE_REQUESTS_SKIP = frozenset({"https://cloud.vast.ai/api/v0"})


class RequestOutcome(str, Enum):
    """How a request ended, spelled as the autoscaler expects in ``delete_requests``."""

    SUCCESS = "Success"
    ERROR = "Error"
    CANCELLED = "Cancelled"
    REJECTED = "Rejected"


@dataclass(frozen=True)
class FinishedRequest:
    """One entry of a ``delete_requests`` batch."""

    request_idx: int
    success: bool
    status: str
    entered_queue_at: float
    work_started_at: float
    work_completed_at: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WorkerStatus:
    """The body of one ``worker_status`` report; field names are the autoscaler's."""

    id: int
    mtoken: str
    version: str
    loadtime: float
    cur_load: float
    rej_load: float
    new_load: float
    error_msg: str
    max_perf: float
    cur_perf: float
    cur_capacity: int
    max_capacity: int
    num_requests_working: int
    num_requests_recieved: int
    additional_disk_usage: float
    disk_usage: float
    working_request_idxs: list[int]
    url: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _InFlight:
    workload: float
    entered_queue_at: float
    work_started_at: float = 0.0
    is_session: bool = False


@dataclass
class _Window:
    """Workload counted since the last delivered report."""

    received: float = 0.0
    cancelled: float = 0.0
    rejected: float = 0.0
    served: float = 0.0

    def copy(self) -> _Window:
        return _Window(self.received, self.cancelled, self.rejected, self.served)

    def subtract(self, sent: _Window) -> None:
        # Subtract what was reported rather than zeroing: requests may have finished while
        # the report was on the wire, and those belong to the next report.
        self.received -= sent.received
        self.cancelled -= sent.cancelled
        self.rejected -= sent.rejected
        self.served -= sent.served


@dataclass
class _State:
    loadtime: float = 0.0    # 0 until ready, then in every report
    error_msg: str = ""
    max_perf: float = 0.0


@dataclass
class _Disk:
    baseline_gb: float | None = None
    current_gb: float | None = None

    @property
    def additional_gb(self) -> float:
        if self.baseline_gb is None or self.current_gb is None:
            return 0.0
        return self.current_gb - self.baseline_gb


@dataclass
class _Stats:
    reports_sent: int = 0
    deletes_sent: int = 0
    deletes_dropped: int = 0
    last_report_at: float | None = None


class StatusReporter:
    """Counts requests in workload units and reports them to the autoscaler in the background.

    Call :meth:`start` once an event loop runs and :meth:`stop` on shutdown (or use it as an
    async context manager). The session is the caller's and is never closed here.
    """

    def __init__(
        self,
        env: AutoscalerEnv,
        session: aiohttp.ClientSession,
        interval: float = 10.0,
        *,
        min_interval: float = 1.0,
        delete_interval: float = 1.0,
        timeout: float = 5.0,
        version: str = PROTOCOL_VERSION,
        disk_path: str | None = "/",
        disk_used: Callable[[], float | None] | None = None,
        max_pending_deletes: int = 10_000,
        delete_batch: int = 500,
        failure_log_every: int = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval <= 0 or min_interval <= 0 or delete_interval <= 0 or timeout <= 0:
            raise ValueError("interval, min_interval, delete_interval and timeout must be > 0")
        if min_interval > interval:
            raise ValueError("min_interval must not exceed interval")
        if max_pending_deletes < 1 or delete_batch < 1:
            raise ValueError("max_pending_deletes and delete_batch must be at least 1")
        self._env = env
        self._session = session
        self._interval = interval
        self._min_interval = min_interval
        self._delete_interval = delete_interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._version = version
        self._disk_path = disk_path
        # The disk guard's last sample of disk_path (used GiB), when there is one: the reporter
        # then measures nothing itself.
        self._disk_used = disk_used
        self._delete_batch = delete_batch
        self._clock = clock

        self._in_flight: dict[int, _InFlight] = {}
        self._window = _Window()
        self._total_received = 0
        self._state = _State()
        self._disk = _Disk()
        self._deletes: deque[FinishedRequest] = deque()
        self._max_pending_deletes = max_pending_deletes
        self.stats = _Stats()

        # Scheduling: ``_urgent`` asks for a report now (state change), ``_dirty`` for one
        # within ``min_interval`` (request activity, or a failed attempt to retry).
        self._urgent = False
        self._dirty = False
        self._last_attempt = -math.inf
        self._wake = asyncio.Event()
        self._report_lock = asyncio.Lock()
        self._delete_lock = asyncio.Lock()
        self._preferred = 0
        self._status_failures = FailureLog(log, "reporting worker status to the autoscaler",
                                           failure_log_every)
        self._delete_failures = FailureLog(log, "sending finished requests to the autoscaler",
                                           failure_log_every)
        self._tasks: list[asyncio.Task[None]] = []

    # ----------------------------------------------------------------- request accounting

    def request_received(self, request_idx: int, workload: float = 1.0,
                         entered_queue_at: float | None = None) -> None:
        """An authenticated request was accepted (queued or started); it is now in flight."""
        if request_idx in self._in_flight:
            log.debug("request_idx %s received twice while in flight", request_idx)
        self._in_flight[request_idx] = _InFlight(
            workload=workload, entered_queue_at=_first(entered_queue_at, self._clock()))
        self._window.received += workload
        self._total_received += 1
        self._mark_dirty()

    def session_opened(self, request_idx: int, workload: float = 1.0) -> None:
        """A session began: it holds its workload (cur_load, working_request_idxs) until closed."""
        now = self._clock()
        self._in_flight[request_idx] = _InFlight(workload=workload, entered_queue_at=now,
                                                 work_started_at=now, is_session=True)
        self._window.received += workload
        self._total_received += 1
        self._mark_dirty()

    def session_closed(self, request_idx: int) -> None:
        """A session ended (closed or expired): served, and finished as a Success."""
        self.request_finished(request_idx, True, RequestOutcome.SUCCESS)

    def session_request(self, workload: float = 1.0) -> None:
        """A request inside a session was accepted: new load, but no request of its own."""
        self._window.received += workload
        self._mark_dirty()

    def session_request_rejected(self, workload: float = 1.0) -> None:
        """A request inside a session was refused: rejected load, no request of its own."""
        self._window.rejected += workload
        self._mark_dirty()

    def session_request_done(self, workload: float, status: RequestOutcome | str) -> None:
        outcome = _outcome_text(status)
        if outcome == RequestOutcome.CANCELLED.value:
            self._window.cancelled += workload
        elif outcome == RequestOutcome.SUCCESS.value:
            self._window.served += workload
        self._mark_dirty()

    def request_started(self, request_idx: int) -> None:
        """Work on the request began (it left the queue); records ``work_started_at``."""
        entry = self._in_flight.get(request_idx)
        if entry is not None:
            entry.work_started_at = self._clock()

    def request_finished(
        self,
        request_idx: int,
        success: bool,
        status: RequestOutcome | str,
        entered_queue_at: float | None = None,
        work_started_at: float | None = None,
        work_completed_at: float | None = None,
    ) -> None:
        """The request ended; it leaves the in-flight set and is queued for delete_requests.

        Timestamps (epoch seconds) default to those recorded by :meth:`request_received` /
        :meth:`request_started` and to now for completion.
        """
        entry = self._in_flight.pop(request_idx, None)
        workload = entry.workload if entry is not None else 1.0
        outcome = _outcome_text(status)
        if outcome == RequestOutcome.CANCELLED.value:
            self._window.cancelled += workload
        elif success:
            self._window.served += workload
        recorded_queued = entry.entered_queue_at if entry is not None else None
        recorded_started = entry.work_started_at if entry is not None else None
        self._queue_delete(
            FinishedRequest(
                request_idx=request_idx,
                success=bool(success),
                status=outcome,
                entered_queue_at=_first(entered_queue_at, recorded_queued),
                work_started_at=_first(work_started_at, recorded_started),
                # A cancelled request did not complete (the SDK sends 0.0, "never").
                work_completed_at=0.0 if outcome == RequestOutcome.CANCELLED.value
                else _first(work_completed_at, self._clock()),
            )
        )
        self._mark_dirty()

    def request_rejected(
        self, workload: float = 1.0, request_idx: int | None = None,
        entered_queue_at: float | None = None,
    ) -> None:
        """A request was refused before any work (bad signature, not serving, queue full,
        estimated wait too long): counted once, in ``rej_load`` and not in ``new_load``.

        With a ``request_idx`` it is also reported as finished with status "Rejected", so the
        autoscaler can route it elsewhere at once.
        """
        self._window.rejected += workload
        self._total_received += 1
        if request_idx is not None:
            entry = self._in_flight.pop(request_idx, None)
            self._queue_delete(
                FinishedRequest(
                    request_idx=request_idx,
                    success=False,
                    status=RequestOutcome.REJECTED.value,
                    entered_queue_at=entry.entered_queue_at if entry else
                    _first(entered_queue_at, self._clock()),
                    work_started_at=0.0,
                    work_completed_at=0.0,
                )
            )
        self._mark_dirty()

    # ----------------------------------------------------------------------- worker state

    def set_state(
        self,
        *,
        loadtime: float,
        max_perf: float,
        error_msg: str = "",
    ) -> None:
        """What the worker can do: ``loadtime`` (seconds from start to ready; 0 before, then
        sent in every report), ``max_perf`` (workload per second) and ``error_msg`` (what will
        not heal). A change is reported at once.
        """
        state = self._state
        changes: list[str] = []
        if float(loadtime) != state.loadtime:
            changes.append(f"loadtime {state.loadtime:g} -> {float(loadtime):g}")
            state.loadtime = float(loadtime)
        if error_msg != state.error_msg:
            changes.append(f"error_msg {state.error_msg!r} -> {error_msg!r}")
            state.error_msg = error_msg
        if float(max_perf) != state.max_perf:
            changes.append(f"max_perf {state.max_perf:g} -> {float(max_perf):g}")
            state.max_perf = float(max_perf)
        if changes:
            log.info("autoscaler state change: %s", "; ".join(changes))
            self._urgent = True
            self._wake.set()

    # --------------------------------------------------------------------------- views

    @property
    def pending_deletes(self) -> int:
        return len(self._deletes)

    @property
    def consecutive_failures(self) -> int:
        """Failed report attempts in a row (0 while the autoscaler answers)."""
        return self._status_failures.consecutive

    def snapshot(self) -> WorkerStatus:
        """The report that would be sent now (nothing is reset)."""
        return self._build()

    # ----------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._status_loop(), name="autoscaler-status"),
            asyncio.create_task(self._delete_loop(), name="autoscaler-delete-requests"),
        ]

    async def stop(self, *, flush: bool = True, flush_timeout: float = 3.0) -> None:
        """Stop the loops; with ``flush``, make one last bounded attempt to deliver."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if flush and tasks:
            try:
                await asyncio.wait_for(self._final_flush(), flush_timeout)
            except asyncio.TimeoutError:
                log.warning("final report to the autoscaler timed out after %.1fs", flush_timeout)

    async def __aenter__(self) -> StatusReporter:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _final_flush(self) -> None:
        await self.report_now()
        if self._deletes:
            await self.flush_deletes()

    # ------------------------------------------------------------------------- sending

    async def report_now(self) -> bool:
        """Send one status report; True when an autoscaler address accepted it."""
        async with self._report_lock:
            self._urgent = False
            self._dirty = False
            self._last_attempt = time.monotonic()
            await self._measure_disk()
            sent_window = self._window.copy()
            status = self._build()
            ok = await self._post_to_any("/worker_status/", status.to_json(),
                                         self._status_failures)
            if ok:
                self._window.subtract(sent_window)
                if self._disk.current_gb is not None:
                    self._disk.baseline_gb = self._disk.current_gb
                self.stats.reports_sent += 1
                self.stats.last_report_at = self._clock()
            else:
                # Retry sooner than the regular cadence, backing off while it keeps failing.
                self._dirty = True
            return ok

    async def flush_deletes(self) -> bool:
        """Send up to one batch of finished requests; True when delivered (or none pending)."""
        async with self._delete_lock:
            batch = list(itertools.islice(self._deletes, self._delete_batch))
            if not batch:
                return True
            if all(addr in DELETE_REQUESTS_SKIP for addr in self._env.report_addrs):
                log.debug("no autoscaler address takes delete_requests; dropping %d", len(batch))
                self._deletes.clear()
                return True
            body = {
                "worker_id": self._env.container_id,
                "mtoken": self._env.master_token,
                "requests": [item.to_json() for item in batch],
            }
            ok = await self._post_to_any("/delete_requests/", body, self._delete_failures,
                                         skip=DELETE_REQUESTS_SKIP)
            if ok:
                sent = {id(item) for item in batch}
                # Only the front can have changed meanwhile (overflow drops from the left),
                # so the delivered items are still a prefix of what is left.
                while self._deletes and id(self._deletes[0]) in sent:
                    self._deletes.popleft()
                self.stats.deletes_sent += len(batch)
            return ok

    async def _status_loop(self) -> None:
        while True:
            self._wake.clear()
            delay = self._next_report_delay()
            if delay > 0:
                await wait_event(self._wake, delay)
                continue
            try:
                await self.report_now()
            except Exception:  # a bug here must not silence reporting for good
                log.exception("unexpected error while reporting to the autoscaler")
                self._last_attempt = time.monotonic()

    async def _delete_loop(self) -> None:
        while True:
            failures = self._delete_failures.consecutive
            delay = min(self._interval, self._delete_interval * 2 ** min(failures, 16))
            await asyncio.sleep(delay)
            if not self._deletes:
                continue
            try:
                await self.flush_deletes()
            except Exception:
                log.exception("unexpected error while sending finished requests")

    def _next_report_delay(self) -> float:
        failures = self._status_failures.consecutive
        gap = self._min_interval * 2 ** min(failures, 16)
        if self._urgent and failures == 0:
            due = self._last_attempt
        elif self._urgent or self._dirty:
            due = self._last_attempt + gap
        else:
            due = self._last_attempt + self._interval
        due = min(due, self._last_attempt + self._interval)
        return due - time.monotonic()

    async def _post_to_any(
        self,
        path: str,
        body: dict[str, Any],
        failures: FailureLog,
        skip: frozenset[str] = frozenset(),
    ) -> bool:
        addrs = self._env.report_addrs
        order = [(self._preferred + i) % len(addrs) for i in range(len(addrs))]
        problems: list[str] = []
        for index in order:
            addr = addrs[index]
            if addr in skip:
                continue
            url = f"{addr}{path}"
            try:
                async with self._session.post(url, json=body, timeout=self._timeout) as resp:
                    if 200 <= resp.status < 300:
                        # Start with the address that answered next time, so a dead first
                        # address costs one timeout per outage, not one per report.
                        self._preferred = index
                        failures.succeeded()
                        return True
                    problems.append(f"{url}: HTTP {resp.status}")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                problems.append(f"{url}: {type(exc).__name__} {exc}".rstrip())
        failures.failed("; ".join(problems))
        return False

    # ------------------------------------------------------------------------- helpers

    def _mark_dirty(self) -> None:
        self._dirty = True
        self._wake.set()

    def _queue_delete(self, item: FinishedRequest) -> None:
        if len(self._deletes) >= self._max_pending_deletes:
            self._deletes.popleft()
            self.stats.deletes_dropped += 1
            if self.stats.deletes_dropped == 1 or self.stats.deletes_dropped % 1000 == 0:
                log.warning(
                    "finished-request queue full (%d); dropped %d oldest so far",
                    self._max_pending_deletes,
                    self.stats.deletes_dropped,
                )
        self._deletes.append(item)

    async def _measure_disk(self) -> None:
        if self._disk_path is None:
            return
        used = self._disk_used() if self._disk_used is not None else None
        if used is None:  # no guard, or before its first sample
            try:
                used = await asyncio.to_thread(disk_used_gib, self._disk_path)
            except OSError as exc:
                log.debug("disk usage of %s unavailable: %s", self._disk_path, exc)
                return
        self._disk.current_gb = used
        if self._disk.baseline_gb is None:
            self._disk.baseline_gb = self._disk.current_gb

    def _build(self) -> WorkerStatus:
        window = self._window
        state = self._state
        return WorkerStatus(
            id=self._env.container_id,
            mtoken=self._env.master_token,
            version=self._version,
            loadtime=state.loadtime,
            cur_load=float(sum(entry.workload for entry in self._in_flight.values())),
            rej_load=max(window.rejected, 0.0),
            new_load=max(window.received - window.cancelled, 0.0),
            error_msg=state.error_msg,
            max_perf=state.max_perf,
            cur_perf=max(window.served, 0.0),
            cur_capacity=0,
            max_capacity=0,
            num_requests_working=len(self._in_flight),
            num_requests_recieved=self._total_received,
            additional_disk_usage=self._disk.additional_gb,
            disk_usage=self._disk.current_gb or 0.0,
            working_request_idxs=list(self._in_flight),
            url=self._env.public_url,
        )


def _outcome_text(status: RequestOutcome | str) -> str:
    if isinstance(status, RequestOutcome):
        return status.value
    try:
        return RequestOutcome(status).value
    except ValueError:
        return str(status)


def _first(*values: float | None) -> float:
    """The first given, non-zero timestamp (0.0 is the protocol's "never")."""
    for value in values:
        if value:
            return float(value)
    return 0.0
