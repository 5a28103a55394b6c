"""XID and double-bit ECC events from NVML, watched by a background thread.

NVML delivers these through an event set: register each GPU for the event
types it supports, then block in ``nvmlEventSetWait``. The wait has a timeout
so the thread notices ``stop()``. Where NVML or the GPUs cannot deliver events
(no driver, containers without the capability, some boards), the watcher
settles in state NOT_SUPPORTED with a reason and records nothing.

``on_event`` is called in the watcher thread. To hand events to asyncio, pass
``lambda e: loop.call_soon_threadsafe(queue.put_nowait, e)``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from .model import EventKind, GpuEvent, Severity, _Record
from .nvml import NvmlReader
from .xid import XidTable, load_xid_table

log = logging.getLogger(__name__)

_LOG_LEVEL = {Severity.INFO: logging.INFO, Severity.WARNING: logging.WARNING,
              Severity.CRITICAL: logging.ERROR}


class EventWatchState(str, enum.Enum):
    NOT_STARTED = "not_started"
    STARTING = "starting"
    RUNNING = "running"
    NOT_SUPPORTED = "not_supported"
    STOPPED = "stopped"


@dataclass(frozen=True)
class EventWatchStatus(_Record):
    state: EventWatchState
    detail: str | None = None  # why events are not supported, or why the watch ended
    gpus: tuple[int, ...] = ()  # the GPUs registered for events


class XidEventWatcher:
    """Records XID critical errors and double-bit ECC events with their meaning.

    Critical events are kept apart from the rest, so a burst of harmless XIDs
    cannot push a "fallen off the bus" out of the bounded history.
    """

    def __init__(
        self,
        reader: NvmlReader,
        xid_table: XidTable | None = None,
        *,
        wait_timeout_ms: int = 500,
        max_events: int = 256,
        on_event: Callable[[GpuEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._reader = reader
        self._table = xid_table if xid_table is not None else load_xid_table()
        self._wait_ms = wait_timeout_ms
        self._on_event = on_event
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._recent: deque[GpuEvent] = deque(maxlen=max_events)
        self._critical: deque[GpuEvent] = deque(maxlen=max_events)
        self._status = EventWatchStatus(EventWatchState.NOT_STARTED)
        self._settled = threading.Event()  # registration finished, one way or the other
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- control -----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("XidEventWatcher.start() was already called; make a new watcher")
        self._set_status(EventWatchStatus(EventWatchState.STARTING))
        # A daemon thread: a driver hung inside nvmlEventSetWait must not keep
        # the process alive at exit.
        self._thread = threading.Thread(target=self._run, name="gpu-xid-events", daemon=True)
        self._thread.start()

    def wait_settled(self, timeout: float | None = None) -> EventWatchStatus:
        """Block until the watcher is RUNNING or has given up; return the status."""
        self._settled.wait(timeout)
        return self.status()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout if timeout is not None else self._wait_ms / 1000.0 + 2.0)
            if thread.is_alive():
                log.warning("GPU event thread still inside NVML after stop; leaving it")

    async def astop(self, timeout: float | None = None) -> None:
        await asyncio.to_thread(self.stop, timeout)

    # -- reading -------------------------------------------------------------------

    def status(self) -> EventWatchStatus:
        with self._lock:
            return self._status

    def events(self, since: float | None = None) -> list[GpuEvent]:
        """Recorded events, oldest first; ``since`` is a ``time.monotonic()`` value."""
        with self._lock:
            merged = {id(e): e for e in (*self._critical, *self._recent)}
        found = sorted(merged.values(), key=lambda e: e.monotonic)
        return [e for e in found if since is None or e.monotonic >= since]

    # -- the thread ----------------------------------------------------------------

    def _set_status(self, status: EventWatchStatus) -> None:
        with self._lock:
            old, self._status = self._status, status
        if old.state is not status.state:
            log.info("GPU event watch %s -> %s (%s)", old.state.value, status.state.value,
                     status.detail or "ok")
        if status.state is not EventWatchState.STARTING:
            self._settled.set()

    def _run(self) -> None:
        try:
            self._watch()
        except Exception as exc:  # the thread must end with a status, not a traceback only
            log.exception("GPU event watch failed")
            self._set_status(EventWatchStatus(EventWatchState.STOPPED, f"failed: {exc}"))
        else:
            if self.status().state is not EventWatchState.NOT_SUPPORTED:
                self._set_status(EventWatchStatus(EventWatchState.STOPPED, "stopped"))

    def _not_supported(self, why: str) -> None:
        self._set_status(EventWatchStatus(EventWatchState.NOT_SUPPORTED, f"events not supported: {why}"))

    def _watch(self) -> None:
        status = self._reader.status()
        if not status.available:
            self._not_supported(f"NVML {status.state.value}: {status.error}")
            return
        nv, kinds = self._reader.backend, self._reader.error_kinds
        # Our own reference on NVML (it counts nvmlInit calls), so closing the
        # reader does not pull the library out from under a waiting thread.
        try:
            nv.nvmlInit()
        except kinds.base as exc:
            self._not_supported(str(exc))
            return
        try:
            self._watch_initialised(nv, kinds)
        finally:
            try:
                nv.nvmlShutdown()
            except Exception as exc:
                log.debug("nvmlShutdown failed: %s", exc)

    def _watch_initialised(self, nv: Any, kinds: Any) -> None:
        try:
            event_set = nv.nvmlEventSetCreate()
        except (kinds.base, AttributeError) as exc:
            self._not_supported(str(exc))
            return
        try:
            try:
                registered = self._register(nv, kinds, event_set)
            except kinds.base as exc:  # the GPU count itself failed
                self._not_supported(str(exc))
                return
            if not registered:
                self._not_supported("no GPU accepts XID or ECC event registration")
                return
            self._set_status(EventWatchStatus(EventWatchState.RUNNING, gpus=tuple(registered)))
            self._loop(nv, kinds, event_set)
        finally:
            try:
                nv.nvmlEventSetFree(event_set)
            except Exception as exc:
                log.debug("nvmlEventSetFree failed: %s", exc)

    def _register(self, nv: Any, kinds: Any, event_set: Any) -> list[int]:
        wanted = nv.nvmlEventTypeXidCriticalError | nv.nvmlEventTypeDoubleBitEccError
        registered = []
        for index in range(nv.nvmlDeviceGetCount()):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                mask = wanted & nv.nvmlDeviceGetSupportedEventTypes(handle)
                if mask:
                    nv.nvmlDeviceRegisterEvents(handle, mask, event_set)
                    registered.append(index)
            except kinds.base as exc:
                log.info("GPU %d: no XID/ECC events (%s)", index, exc)
        return registered

    def _loop(self, nv: Any, kinds: Any, event_set: Any) -> None:
        timeout_error = getattr(nv, "NVMLError_Timeout", ())
        last_error = None
        while not self._stop.is_set():
            try:
                data = nv.nvmlEventSetWait(event_set, self._wait_ms)
            except kinds.base as exc:
                if timeout_error and isinstance(exc, timeout_error):
                    continue
                if str(exc) != last_error:  # once per distinct error, not once a second
                    log.warning("NVML event wait failed: %s", exc)
                    last_error = str(exc)
                self._stop.wait(1.0)
                continue
            last_error = None
            self._record(nv, kinds, data)

    def _record(self, nv: Any, kinds: Any, data: Any) -> None:
        try:
            gpu_index: int | None = nv.nvmlDeviceGetIndex(data.device)
        except kinds.base:
            gpu_index = None
        if data.eventType & nv.nvmlEventTypeXidCriticalError:
            info = self._table.lookup(int(data.eventData))
            kind, xid, meaning, severity = EventKind.XID, info.code, info.meaning, info.severity
        elif data.eventType & nv.nvmlEventTypeDoubleBitEccError:
            kind, xid, meaning, severity = (EventKind.DOUBLE_BIT_ECC, None, "double-bit ECC error",
                                            Severity.CRITICAL)
        else:
            return
        event = GpuEvent(time=self._wall_clock(), monotonic=self._clock(), gpu_index=gpu_index,
                         kind=kind, xid=xid, meaning=meaning, severity=severity)
        with self._lock:
            self._recent.append(event)
            if severity is Severity.CRITICAL:
                self._critical.append(event)
        what = f"XID {xid} ({meaning})" if xid is not None else meaning
        log.log(_LOG_LEVEL[severity], "GPU %s: %s [%s]", "?" if gpu_index is None else gpu_index,
                what, severity.value)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("GPU event callback failed")
