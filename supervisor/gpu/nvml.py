"""Reading NVML: the only module that imports ``pynvml``.

``NvmlReader`` is synchronous and thread-safe; ``AsyncNvmlReader`` runs its
reads in a worker thread so the event loop never waits on the driver.

Failure handling, from the outside in:

* NVML cannot start (no driver, no library): nothing is raised. The state is
  kept in an :class:`NvmlStatus` and every snapshot carries it. Starting is
  tried again at most every ``init_retry_s`` seconds, since a driver can appear
  after the daemon (container start-up races).
* One GPU is lost (``NVMLError_GpuIsLost``, a reset needed, or no handle for
  it): that GPU becomes a record with ``state`` LOST / UNAVAILABLE, and the
  other GPUs still report.
* One field is not supported on this board, or by this driver or pynvml: the
  field is ``None``. Every optional field goes through ``_Fields.get``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any, Callable, Collection

from .errors import GpuReadTimeout
from .model import (
    ClockEventReason,
    Clocks,
    Ecc,
    GpuProcess,
    GpuRecord,
    GpuSnapshot,
    GpuState,
    Memory,
    NvmlState,
    NvmlStatus,
    Pcie,
    Power,
    RemappedRows,
    RetiredPages,
    Temperature,
    Utilization,
)

log = logging.getLogger(__name__)

# Errors meaning "this field is not available here", not "the GPU is broken".
_UNSUPPORTED = (
    "NVMLError_NotSupported",
    "NVMLError_FunctionNotFound",  # the driver is older than the call
    "NVMLError_NoPermission",  # some counters need root inside containers
    "NVMLError_NoData",
    "NVMLError_NotFound",
)
_LOST = ("NVMLError_GpuIsLost", "NVMLError_ResetRequired")
_NO_DRIVER = ("NVMLError_DriverNotLoaded", "NVMLError_LibraryNotFound")

# Bits of nvmlClocksEventReasons (the same values under the older
# nvmlClocksThrottleReason* names); they are part of NVML's ABI.
_REASON_BITS: tuple[tuple[ClockEventReason, int], ...] = (
    (ClockEventReason.GPU_IDLE, 0x001),
    (ClockEventReason.APPLICATIONS_CLOCKS, 0x002),
    (ClockEventReason.SW_POWER_CAP, 0x004),
    (ClockEventReason.HW_SLOWDOWN, 0x008),
    (ClockEventReason.SYNC_BOOST, 0x010),
    (ClockEventReason.SW_THERMAL_SLOWDOWN, 0x020),
    (ClockEventReason.HW_THERMAL_SLOWDOWN, 0x040),
    (ClockEventReason.HW_POWER_BRAKE, 0x080),
    (ClockEventReason.DISPLAY_CLOCKS, 0x100),
)

_MIB = 1024 * 1024
_PSTATE_UNKNOWN = 32


def decode_clock_reasons(mask: int) -> tuple[ClockEventReason, ...]:
    """Names for the bits set in an NVML clock-event (throttle) reason mask."""
    return tuple(reason for reason, bit in _REASON_BITS if mask & bit)


def format_cuda_version(value: int) -> str:
    """NVML's integer CUDA version (12040) as text ("12.4")."""
    return f"{value // 1000}.{(value % 1000) // 10}"


def load_backend(fake_source: str | os.PathLike[str] | None = None) -> Any:
    """The NVML module to use: a file-driven fake when ``fake_source`` is set, else pynvml.

    Raises ImportError when pynvml is missing; ``NvmlReader`` turns that into a status.
    """
    if fake_source:
        from .fake import FakeNvml

        return FakeNvml.from_file(fake_source)
    import pynvml

    return pynvml


class _GpuLost(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _ErrorKinds:
    """The backend's exception classes, grouped by what they mean to us."""

    def __init__(self, nv: Any) -> None:
        def classes(names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
            found = (getattr(nv, name, None) for name in names)
            return tuple(c for c in found if isinstance(c, type))

        self.base: type[BaseException] = getattr(nv, "NVMLError", Exception)
        # pynvml raises this (not an NVMLError) when an unversioned call meets a
        # driver without the matching versioned symbol.
        mismatch = getattr(nv, "NVMLLibraryMismatchError", None)
        self.mismatch = (mismatch,) if isinstance(mismatch, type) else ()
        self.unsupported = classes(_UNSUPPORTED)
        self.lost = classes(_LOST)
        self.no_driver = classes(_NO_DRIVER)


class _Fields:
    """Reads optional fields of one GPU: not supported -> None, lost -> _GpuLost."""

    def __init__(self, nv: Any, kinds: _ErrorKinds) -> None:
        self._nv = nv
        self._kinds = kinds
        self.errors: dict[str, str] = {}

    def first(self, field: str, functions: tuple[str, ...], *args: Any) -> Any:
        """The first of several spellings of one call that gives an answer."""
        for function in functions:
            self.errors.pop(field, None)
            value = self.get(field, function, *args)
            if value is not None:
                return value
        return None

    def get(self, field: str, function: str, *args: Any) -> Any:
        fn = getattr(self._nv, function, None)
        if fn is None:  # an older pynvml without this call
            return None
        try:
            return fn(*args)
        except self._kinds.mismatch:
            return None
        except self._kinds.base as exc:
            if self._kinds.lost and isinstance(exc, self._kinds.lost):
                raise _GpuLost(exc) from exc
            if self._kinds.unsupported and isinstance(exc, self._kinds.unsupported):
                return None
            self.errors[field] = str(exc)
            return None


def _watts(milliwatts: Any) -> float | None:
    return None if milliwatts is None else milliwatts / 1000.0


def _mib(num_bytes: Any) -> float | None:
    return None if num_bytes is None else num_bytes / _MIB


class NvmlReader:
    """Reads every GPU on the host through NVML (or a stand-in with pynvml's interface).

    ``backend``: the module to call (``pynvml``, or a ``FakeNvml``); default:
    ``load_backend(fake_source)``, resolved on first use.
    """

    def __init__(
        self,
        backend: Any | None = None,
        *,
        fake_source: str | os.PathLike[str] | None = None,
        init_retry_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._nv = backend
        self._fake_source = fake_source
        self._init_retry_s = init_retry_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.RLock()
        self._kinds: _ErrorKinds | None = None
        self._initialised = False
        self._status: NvmlStatus | None = None
        self._last_attempt: float | None = None
        self.driver_version: str | None = None
        self.cuda_version: str | None = None

    # -- lifecycle -------------------------------------------------------------

    def status(self) -> NvmlStatus:
        """Whether NVML is usable; starts it on first call (never raises)."""
        with self._lock:
            return self._ensure_init()

    def close(self) -> None:
        with self._lock:
            if self._initialised:
                self._initialised = False
                try:
                    self._nv.nvmlShutdown()
                except Exception as exc:  # closing must not fail the caller
                    log.debug("nvmlShutdown failed: %s", exc)

    def __enter__(self) -> "NvmlReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def backend(self) -> Any:
        """The NVML module in use (after ``status()``); for ``events.py``."""
        return self._nv

    @property
    def error_kinds(self) -> _ErrorKinds:
        assert self._kinds is not None, "call status() first"
        return self._kinds

    def _set_status(self, status: NvmlStatus) -> NvmlStatus:
        if status != self._status:
            if status.available:
                log.info("NVML available (driver %s, CUDA %s)", self.driver_version, self.cuda_version)
            else:
                log.warning("NVML %s: %s", status.state.value, status.error)
        self._status = status
        return status

    def _classify(self, exc: BaseException) -> NvmlStatus:
        kinds = self._kinds
        if kinds is not None and kinds.no_driver and isinstance(exc, kinds.no_driver):
            return NvmlStatus(NvmlState.NO_DRIVER, str(exc))
        return NvmlStatus(NvmlState.ERROR, str(exc) or type(exc).__name__)

    def _ensure_init(self) -> NvmlStatus:
        if self._initialised and self._status is not None:
            return self._status
        now = self._clock()
        if (
            self._status is not None
            and not self._status.available  # only failures wait before a new try
            and self._last_attempt is not None
            and now - self._last_attempt < self._init_retry_s
        ):
            return self._status
        self._last_attempt = now
        if self._nv is None:
            try:
                self._nv = load_backend(self._fake_source)
            except ImportError as exc:
                return self._set_status(
                    NvmlStatus(NvmlState.ERROR, f"nvidia-ml-py (pynvml) is not installed: {exc}")
                )
            except Exception as exc:  # a broken fake source file, say
                return self._set_status(NvmlStatus(NvmlState.ERROR, str(exc)))
        self._kinds = _ErrorKinds(self._nv)
        try:
            self._nv.nvmlInit()
        except Exception as exc:  # NVMLError, or OSError from a broken library
            return self._set_status(self._classify(exc))
        self._initialised = True
        fields = _Fields(self._nv, self._kinds)
        try:
            self.driver_version = fields.get("driver_version", "nvmlSystemGetDriverVersion")
            cuda = fields.get("cuda_version", "nvmlSystemGetCudaDriverVersion")
        except _GpuLost:
            cuda = None
        self.cuda_version = None if cuda is None else format_cuda_version(cuda)
        return self._set_status(NvmlStatus(NvmlState.AVAILABLE))

    def _drop_init(self, exc: BaseException) -> NvmlStatus:
        """NVML failed under us (driver unloaded): start again later."""
        self.close()
        self._last_attempt = self._clock()
        return self._set_status(self._classify(exc))

    # -- reading ---------------------------------------------------------------

    def snapshot(self, our_pids: Collection[int] | None = None) -> GpuSnapshot:
        """Read every GPU now. Never raises for NVML trouble: see the module doc."""
        with self._lock:
            status = self._ensure_init()
            taken_at, monotonic = self._wall_clock(), self._clock()
            if not status.available:
                return GpuSnapshot(taken_at=taken_at, monotonic=monotonic, status=status)
            nv, kinds = self._nv, self.error_kinds
            try:
                count = nv.nvmlDeviceGetCount()
            except kinds.base as exc:
                status = self._drop_init(exc)
                return GpuSnapshot(taken_at=taken_at, monotonic=monotonic, status=status)
            gpus = tuple(self._read_gpu(index) for index in range(count))
        snap = GpuSnapshot(
            taken_at=taken_at,
            monotonic=monotonic,
            status=status,
            driver_version=self.driver_version,
            cuda_version=self.cuda_version,
            gpus=gpus,
        )
        return snap.with_our_pids(our_pids)

    def _read_gpu(self, index: int) -> GpuRecord:
        nv, kinds = self._nv, self.error_kinds
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
        except kinds.base as exc:
            lost = bool(kinds.lost) and isinstance(exc, kinds.lost)
            log.debug("GPU %d: no handle: %s", index, exc)
            return GpuRecord(index=index, state=GpuState.LOST if lost else GpuState.UNAVAILABLE,
                             error=str(exc))
        try:
            return self._read_fields(index, handle)
        except _GpuLost as lost:
            log.debug("GPU %d: lost: %s", index, lost)
            return GpuRecord(index=index, state=GpuState.LOST, error=str(lost))

    def _read_fields(self, index: int, h: Any) -> GpuRecord:
        nv = self._nv
        f = _Fields(nv, self.error_kinds)

        temperature = Temperature(
            current_c=f.get("temperature", "nvmlDeviceGetTemperature", h, nv.NVML_TEMPERATURE_GPU),
            slowdown_c=f.get("slowdown_c", "nvmlDeviceGetTemperatureThreshold", h,
                             nv.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN),
            shutdown_c=f.get("shutdown_c", "nvmlDeviceGetTemperatureThreshold", h,
                             nv.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN),
        )
        power = Power(
            draw_w=_watts(f.get("power_draw", "nvmlDeviceGetPowerUsage", h)),
            enforced_limit_w=_watts(f.get("enforced_limit", "nvmlDeviceGetEnforcedPowerLimit", h)),
            default_limit_w=_watts(
                f.get("default_limit", "nvmlDeviceGetPowerManagementDefaultLimit", h)
            ),
            energy_mj=f.get("energy", "nvmlDeviceGetTotalEnergyConsumption", h),
        )

        # The new name first; older pynvml/drivers only have the "throttle" one.
        mask = f.first("clock_reasons", ("nvmlDeviceGetCurrentClocksEventReasons",
                                         "nvmlDeviceGetCurrentClocksThrottleReasons"), h)
        power_violation = f.get("power_throttle", "nvmlDeviceGetViolationStatus", h,
                                nv.NVML_PERF_POLICY_POWER)
        thermal_violation = f.get("thermal_throttle", "nvmlDeviceGetViolationStatus", h,
                                  nv.NVML_PERF_POLICY_THERMAL)
        pstate = f.get("pstate", "nvmlDeviceGetPerformanceState", h)
        clocks = Clocks(
            sm_mhz=f.get("sm_clock", "nvmlDeviceGetClockInfo", h, nv.NVML_CLOCK_SM),
            sm_max_mhz=f.get("sm_max_clock", "nvmlDeviceGetMaxClockInfo", h, nv.NVML_CLOCK_SM),
            mem_mhz=f.get("mem_clock", "nvmlDeviceGetClockInfo", h, nv.NVML_CLOCK_MEM),
            mem_max_mhz=f.get("mem_max_clock", "nvmlDeviceGetMaxClockInfo", h, nv.NVML_CLOCK_MEM),
            pstate=None if pstate is None or pstate == _PSTATE_UNKNOWN else f"P{pstate}",
            event_reasons=None if mask is None else decode_clock_reasons(mask),
            event_mask=mask,
            power_throttle_s=None if power_violation is None else power_violation.violationTime / 1e9,
            thermal_throttle_s=(
                None if thermal_violation is None else thermal_violation.violationTime / 1e9
            ),
        )

        util = f.get("utilization", "nvmlDeviceGetUtilizationRates", h)
        mem = f.get("memory", "nvmlDeviceGetMemoryInfo", h)

        ecc_mode = f.get("ecc_mode", "nvmlDeviceGetEccMode", h)
        ecc_enabled = None if ecc_mode is None else ecc_mode[0] == nv.NVML_FEATURE_ENABLED
        if ecc_enabled:
            def ecc_count(name: str, error_type: int, counter: int) -> int | None:
                return f.get(name, "nvmlDeviceGetTotalEccErrors", h, error_type, counter)

            corrected, uncorrected = (nv.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                                      nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
            ecc = Ecc(
                enabled=True,
                volatile_corrected=ecc_count("ecc_volatile_corrected", corrected, nv.NVML_VOLATILE_ECC),
                volatile_uncorrected=ecc_count("ecc_volatile_uncorrected", uncorrected,
                                               nv.NVML_VOLATILE_ECC),
                aggregate_corrected=ecc_count("ecc_aggregate_corrected", corrected,
                                              nv.NVML_AGGREGATE_ECC),
                aggregate_uncorrected=ecc_count("ecc_aggregate_uncorrected", uncorrected,
                                                nv.NVML_AGGREGATE_ECC),
            )
        else:
            # ECC off or absent: the counters are meaningless, do not ask.
            ecc = Ecc(enabled=ecc_enabled)

        sbe = f.get("retired_pages_sbe", "nvmlDeviceGetRetiredPages", h,
                    nv.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS)
        retired = RetiredPages()
        if sbe is not None:
            dbe = f.get("retired_pages_dbe", "nvmlDeviceGetRetiredPages", h,
                        nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)
            pending = f.get("retired_pages_pending", "nvmlDeviceGetRetiredPagesPendingStatus", h)
            retired = RetiredPages(
                single_bit=len(sbe),
                double_bit=None if dbe is None else len(dbe),
                pending=None if pending is None else pending == nv.NVML_FEATURE_ENABLED,
            )

        rows = f.get("remapped_rows", "nvmlDeviceGetRemappedRows", h)
        remapped = RemappedRows() if rows is None else RemappedRows(
            corrected=rows[0], uncorrected=rows[1], pending=bool(rows[2]), failure=bool(rows[3])
        )

        pcie = Pcie(
            gen=f.get("pcie_gen", "nvmlDeviceGetCurrPcieLinkGeneration", h),
            # The best link both the board and its slot support: a Gen4 card in a
            # Gen3 slot is not degraded.
            max_gen=f.get("pcie_max_gen", "nvmlDeviceGetMaxPcieLinkGeneration", h),
            width=f.get("pcie_width", "nvmlDeviceGetCurrPcieLinkWidth", h),
            max_width=f.get("pcie_max_width", "nvmlDeviceGetMaxPcieLinkWidth", h),
            replay_counter=f.get("pcie_replay", "nvmlDeviceGetPcieReplayCounter", h),
        )

        # The plain name is the newest struct version; drivers before it need _v2.
        procs = f.first("processes", ("nvmlDeviceGetComputeRunningProcesses",
                                      "nvmlDeviceGetComputeRunningProcesses_v2"), h)
        processes = None if procs is None else tuple(
            GpuProcess(pid=int(p.pid), used_mib=_mib(getattr(p, "usedGpuMemory", None)))
            for p in procs
        )

        serial = f.get("serial", "nvmlDeviceGetSerial", h)
        return GpuRecord(
            index=index,
            name=f.get("name", "nvmlDeviceGetName", h),
            uuid=f.get("uuid", "nvmlDeviceGetUUID", h),
            serial=serial or None,  # boards without one may answer ""
            driver_version=self.driver_version,
            cuda_version=self.cuda_version,
            temperature=temperature,
            power=power,
            clocks=clocks,
            utilization=Utilization() if util is None else Utilization(util.gpu, util.memory),
            memory=Memory() if mem is None else Memory(_mib(mem.used), _mib(mem.total)),
            ecc=ecc,
            retired_pages=retired,
            remapped_rows=remapped,
            pcie=pcie,
            processes=processes,
            field_errors=f.errors,
        )


class AsyncNvmlReader:
    """Runs ``NvmlReader`` calls in a worker thread, never on the event loop.

    Concurrent ``snapshot()`` callers share one read in flight, so a driver
    that hangs ties up one thread, not one per caller.
    """

    def __init__(self, reader: NvmlReader, *, timeout_s: float | None = 10.0) -> None:
        self.reader = reader
        self.timeout_s = timeout_s
        self._inflight: asyncio.Future[GpuSnapshot] | None = None

    async def status(self) -> NvmlStatus:
        return await asyncio.to_thread(self.reader.status)

    async def snapshot(self, our_pids: Collection[int] | None = None) -> GpuSnapshot:
        """Read every GPU; raises GpuReadTimeout after ``timeout_s``."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(asyncio.to_thread(self.reader.snapshot))
            # Callers that timed out no longer await it: collect its outcome here.
            self._inflight.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            snap = await asyncio.wait_for(asyncio.shield(self._inflight), self.timeout_s)
        except asyncio.TimeoutError:
            raise GpuReadTimeout(f"NVML read took longer than {self.timeout_s} s") from None
        return snap.with_our_pids(our_pids)

    async def close(self) -> None:
        await asyncio.to_thread(self.reader.close)


def read_local_snapshot(
    *, fake_source: str | os.PathLike[str] | None = None, our_pids: Collection[int] | None = None
) -> GpuSnapshot:
    """One snapshot straight from NVML, for the ``health`` CLI when the daemon is down.

    Synchronous; from async code call it through ``asyncio.to_thread``.
    """
    with NvmlReader(fake_source=fake_source, init_retry_s=0.0) as reader:
        return reader.snapshot(our_pids)
