"""A stand-in for ``pynvml`` so the GPU layer can be exercised without a GPU.

``FakeNvml`` has the same function names, constants and exception classes as
``pynvml`` (only the ones ``nvml.py`` and ``events.py`` use), and it is handed
to :class:`supervisor.gpu.nvml.NvmlReader` in place of the real module. It does
not import ``pynvml``.

Two ways to build one:

* a named scenario: ``scenario("thermal_throttling")`` (see ``SCENARIOS``);
* a JSON file: ``FakeNvml.from_file(path)``. The file is read again at each
  sample (``nvmlDeviceGetCount``), at each ``nvmlInit`` and at each event wait,
  so a running daemon started with ``GPU_FAKE_SOURCE=/path/file.json`` follows
  edits to it. A file that cannot be parsed (say, half written) is ignored and
  the last good content stays in force.

File format (every key optional)::

    {
      "nvml_error": null,            # or "driver_not_loaded", "library_not_found",
                                     # "no_permission", "unknown": nvmlInit fails so
      "driver_version": "550.54.15",
      "cuda_version": "12.4",
      "events_supported": true,      # false: nvmlEventSetCreate is "not supported"
      "gpus": [
        {"preset": "h100_sxm",       # h100_sxm (default), a100_sxm, rtx_4090, v100_sxm
         "temperature_c": 91,        # then any FakeGpu field overrides the preset:
         "clock_event_reasons": ["hw_thermal_slowdown"],
         "processes": [{"pid": 4242, "used_mib": 18000}],
         "unsupported": ["serial"]},
        {"lost": true}               # NVML reports this GPU as lost
      ],
      "events": [
        {"gpu": 0, "xid": 79},                   # an XID critical error
        {"gpu": 0, "kind": "double_bit_ecc"},    # a double-bit ECC event
        {"gpu": 1, "xid": 13, "id": "second-13"}
      ]
    }

Each event is delivered once. It is known by its ``id`` (default: its position
in the list), so append new entries to raise new events; an entry already seen
is not delivered again. Units in the file are the human ones (W, MiB, degrees
C, MHz); the fake converts them to NVML's (mW, bytes) on the way out.

The GPU fields are those of :class:`FakeGpu`. Names for ``unsupported`` (each
makes the matching NVML calls raise ``NVMLError_NotSupported``, on top of what
the preset already lacks): see ``FEATURES``. ``clock_event_reasons`` takes
the names of :class:`supervisor.gpu.model.ClockEventReason`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import FakeSourceError

log = logging.getLogger(__name__)

# -- constants (same names and values as pynvml) -----------------------------

NVML_FEATURE_DISABLED = 0
NVML_FEATURE_ENABLED = 1
NVML_TEMPERATURE_GPU = 0
NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = 0
NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = 1
NVML_PERF_POLICY_POWER = 0
NVML_PERF_POLICY_THERMAL = 1

nvmlEventTypeSingleBitEccError = 0x0001
nvmlEventTypeDoubleBitEccError = 0x0002
nvmlEventTypePState = 0x0004
nvmlEventTypeXidCriticalError = 0x0008
nvmlEventTypeClock = 0x0010

nvmlClocksEventReasonGpuIdle = 0x0001
nvmlClocksEventReasonApplicationsClocksSetting = 0x0002
nvmlClocksEventReasonSwPowerCap = 0x0004
nvmlClocksEventReasonHwSlowdown = 0x0008
nvmlClocksEventReasonSyncBoost = 0x0010
nvmlClocksEventReasonSwThermalSlowdown = 0x0020
nvmlClocksEventReasonHwThermalSlowdown = 0x0040
nvmlClocksEventReasonHwPowerBrakeSlowdown = 0x0080
nvmlClocksEventReasonDisplayClockSetting = 0x0100

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_NO_DATA = 21
NVML_ERROR_UNKNOWN = 999

_REASON_BITS = {
    "gpu_idle": nvmlClocksEventReasonGpuIdle,
    "applications_clocks": nvmlClocksEventReasonApplicationsClocksSetting,
    "sw_power_cap": nvmlClocksEventReasonSwPowerCap,
    "hw_slowdown": nvmlClocksEventReasonHwSlowdown,
    "sync_boost": nvmlClocksEventReasonSyncBoost,
    "sw_thermal_slowdown": nvmlClocksEventReasonSwThermalSlowdown,
    "hw_thermal_slowdown": nvmlClocksEventReasonHwThermalSlowdown,
    "hw_power_brake": nvmlClocksEventReasonHwPowerBrakeSlowdown,
    "display_clocks": nvmlClocksEventReasonDisplayClockSetting,
}

# -- exceptions (same class names as pynvml) ---------------------------------

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
    NVML_ERROR_NO_DATA: "No data",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Base of the fake errors; ``value`` is the NVML return code, as in pynvml."""

    value: int = NVML_ERROR_UNKNOWN

    def __init__(self, value: int | None = None, detail: str | None = None) -> None:
        if value is not None:
            self.value = value
        self.detail = detail
        super().__init__(str(self))

    def __str__(self) -> str:
        text = _MESSAGES.get(self.value, "NVML Error with code %d" % self.value)
        return f"{text} ({self.detail})" if self.detail else text


def _error_class(name: str, code: int) -> type[NVMLError]:
    return type(name, (NVMLError,), {"value": code, "__module__": __name__})


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _error_class("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _error_class("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_NotFound = _error_class("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_Timeout = _error_class("NVMLError_Timeout", NVML_ERROR_TIMEOUT)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_FunctionNotFound = _error_class("NVMLError_FunctionNotFound", NVML_ERROR_FUNCTION_NOT_FOUND)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_ResetRequired = _error_class("NVMLError_ResetRequired", NVML_ERROR_RESET_REQUIRED)
NVMLError_NoData = _error_class("NVMLError_NoData", NVML_ERROR_NO_DATA)
NVMLError_Unknown = _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN)

# Names accepted where the file or a scenario says which error to raise.
ERRORS_BY_NAME: dict[str, type[NVMLError]] = {
    "uninitialized": NVMLError_Uninitialized,
    "not_supported": NVMLError_NotSupported,
    "no_permission": NVMLError_NoPermission,
    "not_found": NVMLError_NotFound,
    "driver_not_loaded": NVMLError_DriverNotLoaded,
    "library_not_found": NVMLError_LibraryNotFound,
    "function_not_found": NVMLError_FunctionNotFound,
    "gpu_is_lost": NVMLError_GpuIsLost,
    "reset_required": NVMLError_ResetRequired,
    "unknown": NVMLError_Unknown,
}

# -- the described GPU -------------------------------------------------------

FEATURES = frozenset(
    {
        "serial", "temperature", "temperature_thresholds", "power", "power_limits",
        "default_power_limit", "energy", "clocks", "pstate", "clock_reasons",
        "violation", "utilization", "memory", "ecc", "retired_pages", "remapped_rows",
        "pcie", "pcie_replay", "processes", "events",
    }
)


@dataclass
class FakeGpu:
    """One described GPU, in human units. Mutable: tests change it live."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str | None = None  # default: derived from the index
    serial: str = "1650923012345"
    temperature_c: int = 38
    slowdown_c: int = 90
    shutdown_c: int = 95
    power_w: float = 120.0
    power_limit_w: float = 700.0  # enforced
    default_power_limit_w: float = 700.0
    energy_mj: int = 0  # starting value; the counter then grows with power_w
    sm_clock_mhz: int = 1980
    max_sm_clock_mhz: int = 1980
    mem_clock_mhz: int = 2619
    max_mem_clock_mhz: int = 2619
    pstate: int = 0
    clock_event_reasons: list[str] = field(default_factory=list)
    power_violation_ns: int = 0
    thermal_violation_ns: int = 0
    gpu_util_pct: int = 0
    mem_util_pct: int = 0
    memory_used_mib: float = 512.0
    memory_total_mib: float = 81559.0
    ecc_enabled: bool = True
    ecc_volatile_corrected: int = 0
    ecc_volatile_uncorrected: int = 0
    ecc_aggregate_corrected: int = 0
    ecc_aggregate_uncorrected: int = 0
    retired_single_bit: int = 0
    retired_double_bit: int = 0
    retired_pending: bool = False
    remapped_corrected: int = 0
    remapped_uncorrected: int = 0
    remap_pending: bool = False
    remap_failure: bool = False
    pcie_gen: int = 5
    pcie_max_gen: int = 5
    pcie_width: int = 16
    pcie_max_width: int = 16
    pcie_replay: int = 0
    processes: list[dict[str, Any]] = field(default_factory=list)  # {"pid", "used_mib"}
    lost: bool = False  # every call on the GPU raises NVMLError_GpuIsLost
    handle_error: str | None = None  # nvmlDeviceGetHandleByIndex raises this (ERRORS_BY_NAME)
    unsupported: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        unknown = set(self.unsupported) - FEATURES
        if unknown:
            raise FakeSourceError(
                f"unsupported: unknown feature(s) {sorted(unknown)}; known: {sorted(FEATURES)}"
            )
        bad = [r for r in self.clock_event_reasons if r not in _REASON_BITS]
        if bad:
            raise FakeSourceError(
                f"clock_event_reasons: unknown {bad}; known: {sorted(_REASON_BITS)}"
            )
        if self.handle_error is not None and self.handle_error not in ERRORS_BY_NAME:
            raise FakeSourceError(f"handle_error: unknown error name {self.handle_error!r}")
        self.unsupported = set(self.unsupported)


def h100_sxm(**overrides: Any) -> FakeGpu:
    base: dict[str, Any] = dict(unsupported={"retired_pages"})
    return FakeGpu(**{**base, **overrides})


def a100_sxm(**overrides: Any) -> FakeGpu:
    base: dict[str, Any] = dict(
        name="NVIDIA A100-SXM4-40GB", serial="1564720004321", slowdown_c=92, shutdown_c=97,
        power_limit_w=400.0, default_power_limit_w=400.0, sm_clock_mhz=1410,
        max_sm_clock_mhz=1410, mem_clock_mhz=1215, max_mem_clock_mhz=1215,
        memory_total_mib=40960.0, pcie_gen=4, pcie_max_gen=4, unsupported={"retired_pages"},
    )
    return FakeGpu(**{**base, **overrides})


def rtx_4090(**overrides: Any) -> FakeGpu:
    # GeForce boards: no ECC, no serial, no row remapping, no violation counters.
    base: dict[str, Any] = dict(
        name="NVIDIA GeForce RTX 4090", serial="", temperature_c=45, slowdown_c=87,
        shutdown_c=92, power_w=60.0, power_limit_w=450.0, default_power_limit_w=450.0,
        sm_clock_mhz=2520, max_sm_clock_mhz=3105, mem_clock_mhz=10501,
        max_mem_clock_mhz=10501, memory_total_mib=24564.0, ecc_enabled=False, pcie_gen=4,
        pcie_max_gen=4,
        unsupported={"serial", "ecc", "retired_pages", "remapped_rows", "violation"},
    )
    return FakeGpu(**{**base, **overrides})


def v100_sxm(**overrides: Any) -> FakeGpu:
    # Pre-Ampere: retired pages instead of row remapping.
    base: dict[str, Any] = dict(
        name="Tesla V100-SXM2-16GB", serial="0323018012345", slowdown_c=90, shutdown_c=95,
        power_limit_w=300.0, default_power_limit_w=300.0, sm_clock_mhz=1530,
        max_sm_clock_mhz=1530, mem_clock_mhz=877, max_mem_clock_mhz=877,
        memory_total_mib=16160.0, pcie_gen=3, pcie_max_gen=3, unsupported={"remapped_rows"},
    )
    return FakeGpu(**{**base, **overrides})


PRESETS: dict[str, Callable[..., FakeGpu]] = {
    "h100_sxm": h100_sxm,
    "a100_sxm": a100_sxm,
    "rtx_4090": rtx_4090,
    "v100_sxm": v100_sxm,
}

# -- handles and event data --------------------------------------------------


@dataclass(frozen=True)
class FakeHandle:
    index: int


@dataclass(frozen=True)
class FakeProcessInfo:
    pid: int
    usedGpuMemory: int | None  # bytes, None when unknown (as in pynvml)
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass(frozen=True)
class FakeUtilization:
    gpu: int
    memory: int


@dataclass(frozen=True)
class FakeMemoryInfo:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class FakeViolationTime:
    referenceTime: int
    violationTime: int  # ns


@dataclass(frozen=True)
class FakeEventData:
    device: FakeHandle
    eventType: int
    eventData: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass
class FakeEventSet:
    registrations: dict[int, int] = field(default_factory=dict)  # gpu index -> event mask
    freed: bool = False


@dataclass(frozen=True)
class _PendingEvent:
    gpu: int
    event_type: int
    data: int


_MIB = 1024 * 1024

# -- the fake module ---------------------------------------------------------


class FakeNvml:
    """An object that answers like the ``pynvml`` module does."""

    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NoPermission = NVMLError_NoPermission
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_Timeout = NVMLError_Timeout
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_FunctionNotFound = NVMLError_FunctionNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_ResetRequired = NVMLError_ResetRequired
    NVMLError_NoData = NVMLError_NoData
    NVMLError_Unknown = NVMLError_Unknown

    NVML_FEATURE_DISABLED = NVML_FEATURE_DISABLED
    NVML_FEATURE_ENABLED = NVML_FEATURE_ENABLED
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
    NVML_CLOCK_GRAPHICS = NVML_CLOCK_GRAPHICS
    NVML_CLOCK_SM = NVML_CLOCK_SM
    NVML_CLOCK_MEM = NVML_CLOCK_MEM
    NVML_MEMORY_ERROR_TYPE_CORRECTED = NVML_MEMORY_ERROR_TYPE_CORRECTED
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = NVML_VOLATILE_ECC
    NVML_AGGREGATE_ECC = NVML_AGGREGATE_ECC
    NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = (
        NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
    )
    NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
    NVML_PERF_POLICY_POWER = NVML_PERF_POLICY_POWER
    NVML_PERF_POLICY_THERMAL = NVML_PERF_POLICY_THERMAL
    nvmlEventTypeSingleBitEccError = nvmlEventTypeSingleBitEccError
    nvmlEventTypeDoubleBitEccError = nvmlEventTypeDoubleBitEccError
    nvmlEventTypePState = nvmlEventTypePState
    nvmlEventTypeXidCriticalError = nvmlEventTypeXidCriticalError
    nvmlEventTypeClock = nvmlEventTypeClock
    nvmlClocksEventReasonGpuIdle = nvmlClocksEventReasonGpuIdle
    nvmlClocksEventReasonApplicationsClocksSetting = nvmlClocksEventReasonApplicationsClocksSetting
    nvmlClocksEventReasonSwPowerCap = nvmlClocksEventReasonSwPowerCap
    nvmlClocksEventReasonHwSlowdown = nvmlClocksEventReasonHwSlowdown
    nvmlClocksEventReasonSyncBoost = nvmlClocksEventReasonSyncBoost
    nvmlClocksEventReasonSwThermalSlowdown = nvmlClocksEventReasonSwThermalSlowdown
    nvmlClocksEventReasonHwThermalSlowdown = nvmlClocksEventReasonHwThermalSlowdown
    nvmlClocksEventReasonHwPowerBrakeSlowdown = nvmlClocksEventReasonHwPowerBrakeSlowdown
    nvmlClocksEventReasonDisplayClockSetting = nvmlClocksEventReasonDisplayClockSetting

    def __init__(
        self,
        gpus: Iterable[FakeGpu] = (),
        *,
        init_error: str | None = None,
        driver_version: str = "550.54.15",
        cuda_version: str = "12.4",
        events_supported: bool = True,
        clock: Callable[[], float] = time.monotonic,
        file_poll_s: float = 0.05,
    ) -> None:
        if init_error is not None and init_error not in ERRORS_BY_NAME:
            raise FakeSourceError(f"nvml_error: unknown error name {init_error!r}")
        self.gpus: list[FakeGpu] = list(gpus)
        self.init_error = init_error
        self.driver_version = driver_version
        self.cuda_version = cuda_version
        self.events_supported = events_supported
        self.clock = clock
        self.file_poll_s = file_poll_s
        self.init_count = 0  # nvmlInit calls minus nvmlShutdown calls
        # (function, thread id) of recent calls, for tests; bounded for long runs.
        self.calls: deque[tuple[str, int]] = deque(maxlen=1000)
        self._cond = threading.Condition(threading.RLock())
        self._pending: list[_PendingEvent] = []
        self._energy: dict[int, tuple[float, float]] = {}  # index -> (mJ, at)
        self._source: Path | None = None
        self._source_error: str | None = None
        self._source_loaded = False
        self._seen_event_ids: set[str] = set()

    # -- building ------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, *, clock: Callable[[], float] = time.monotonic) -> "FakeNvml":
        fake = cls(clock=clock)
        fake._source = Path(path)
        fake._refresh()
        return fake

    def inject_xid(self, gpu: int, xid: int) -> None:
        """Deliver an XID critical-error event for ``gpu`` to the next event wait."""
        self._push(_PendingEvent(gpu, nvmlEventTypeXidCriticalError, xid))

    def inject_double_bit_ecc(self, gpu: int) -> None:
        self._push(_PendingEvent(gpu, nvmlEventTypeDoubleBitEccError, 0))

    def _push(self, event: _PendingEvent) -> None:
        with self._cond:
            self._pending.append(event)
            self._cond.notify_all()

    # -- the file source -----------------------------------------------------

    def _refresh(self) -> None:
        if self._source is None:
            return
        try:
            data = json.loads(self._source.read_text())
            parsed = _parse_source(data)
        except (OSError, ValueError, TypeError) as exc:
            message = f"fake source {self._source}: {exc}"
            if message != self._source_error:
                log.warning("%s; keeping the previous description", message)
            self._source_error = message
            return
        self._source_error = None
        self._source_loaded = True
        with self._cond:
            self.gpus = parsed["gpus"]
            self.init_error = parsed["nvml_error"]
            self.driver_version = parsed["driver_version"]
            self.cuda_version = parsed["cuda_version"]
            self.events_supported = parsed["events_supported"]
            for event_id, event in parsed["events"]:
                if event_id not in self._seen_event_ids:
                    self._seen_event_ids.add(event_id)
                    self._pending.append(event)
            self._cond.notify_all()

    # -- helpers -------------------------------------------------------------

    def _note(self, name: str) -> None:
        self.calls.append((name, threading.get_ident()))

    def _check_init(self) -> None:
        if self.init_count <= 0:
            raise NVMLError_Uninitialized()

    def _gpu(self, handle: FakeHandle, feature: str | None = None) -> FakeGpu:
        self._check_init()
        if not isinstance(handle, FakeHandle) or not 0 <= handle.index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise NVMLError_GpuIsLost()
        if feature is not None and feature in gpu.unsupported:
            raise NVMLError_NotSupported()
        return gpu

    # -- init and system -----------------------------------------------------

    def nvmlInit(self) -> None:
        self._note("nvmlInit")
        self._refresh()
        if self._source is not None and not self._source_loaded:
            # Nothing good was ever read from the file: say so through NVML's channel.
            raise NVMLError_Unknown(detail=self._source_error)
        if self.init_error is not None:
            raise ERRORS_BY_NAME[self.init_error]()
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self._note("nvmlShutdown")
        self._check_init()
        self.init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check_init()
        return self.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check_init()
        major, _, minor = self.cuda_version.partition(".")
        return int(major) * 1000 + int(minor or 0) * 10

    # -- device enumeration --------------------------------------------------

    def nvmlDeviceGetCount(self) -> int:
        self._note("nvmlDeviceGetCount")
        self._refresh()
        self._check_init()
        if self.init_error is not None:
            # The description now says the driver is gone: fail as NVML would.
            raise ERRORS_BY_NAME[self.init_error]()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._check_init()
        if not 0 <= index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        error = self.gpus[index].handle_error
        if error is not None:
            raise ERRORS_BY_NAME[error]()
        return FakeHandle(index)

    def nvmlDeviceGetIndex(self, handle: FakeHandle) -> int:
        self._gpu(handle)
        return handle.index

    # -- identity --------------------------------------------------------------

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        gpu = self._gpu(handle)
        return gpu.uuid or f"GPU-fa4e0000-0000-4000-8000-{handle.index:012d}"

    def nvmlDeviceGetSerial(self, handle: FakeHandle) -> str:
        return self._gpu(handle, "serial").serial

    # -- thermals and power ----------------------------------------------------

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        return self._gpu(handle, "temperature").temperature_c

    def nvmlDeviceGetTemperatureThreshold(self, handle: FakeHandle, threshold: int) -> int:
        gpu = self._gpu(handle, "temperature_thresholds")
        if threshold == NVML_TEMPERATURE_THRESHOLD_SLOWDOWN:
            return gpu.slowdown_c
        if threshold == NVML_TEMPERATURE_THRESHOLD_SHUTDOWN:
            return gpu.shutdown_c
        raise NVMLError_NotSupported()

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return round(self._gpu(handle, "power").power_w * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return round(self._gpu(handle, "power_limits").power_limit_w * 1000)

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: FakeHandle) -> int:
        gpu = self._gpu(handle, "power_limits")
        if "default_power_limit" in gpu.unsupported:
            raise NVMLError_NotSupported()
        return round(gpu.default_power_limit_w * 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        gpu = self._gpu(handle, "energy")
        now = self.clock()
        with self._cond:
            total, at = self._energy.get(handle.index, (float(gpu.energy_mj), now))
            # The counter grows with the current draw, as a real board's does.
            total += gpu.power_w * 1000.0 * max(0.0, now - at)
            self._energy[handle.index] = (total, now)
        return int(total)

    # -- clocks ----------------------------------------------------------------

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        gpu = self._gpu(handle, "clocks")
        return gpu.mem_clock_mhz if clock_type == NVML_CLOCK_MEM else gpu.sm_clock_mhz

    def nvmlDeviceGetMaxClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        gpu = self._gpu(handle, "clocks")
        return gpu.max_mem_clock_mhz if clock_type == NVML_CLOCK_MEM else gpu.max_sm_clock_mhz

    def nvmlDeviceGetPerformanceState(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "pstate").pstate

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        gpu = self._gpu(handle, "clock_reasons")
        mask = 0
        for reason in gpu.clock_event_reasons:
            mask |= _REASON_BITS[reason]
        return mask

    # The deprecated name, still the only one in older pynvml releases.
    nvmlDeviceGetCurrentClocksThrottleReasons = nvmlDeviceGetCurrentClocksEventReasons

    def nvmlDeviceGetViolationStatus(self, handle: FakeHandle, policy: int) -> FakeViolationTime:
        gpu = self._gpu(handle, "violation")
        if policy == NVML_PERF_POLICY_POWER:
            return FakeViolationTime(referenceTime=0, violationTime=gpu.power_violation_ns)
        if policy == NVML_PERF_POLICY_THERMAL:
            return FakeViolationTime(referenceTime=0, violationTime=gpu.thermal_violation_ns)
        raise NVMLError_NotSupported()

    # -- load and memory -------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> FakeUtilization:
        gpu = self._gpu(handle, "utilization")
        return FakeUtilization(gpu=gpu.gpu_util_pct, memory=gpu.mem_util_pct)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: Any = None) -> FakeMemoryInfo:
        gpu = self._gpu(handle, "memory")
        total = int(gpu.memory_total_mib * _MIB)
        used = int(gpu.memory_used_mib * _MIB)
        return FakeMemoryInfo(total=total, free=total - used, used=used)

    # -- ECC and memory health ---------------------------------------------------

    def nvmlDeviceGetEccMode(self, handle: FakeHandle) -> list[int]:
        gpu = self._gpu(handle, "ecc")
        mode = NVML_FEATURE_ENABLED if gpu.ecc_enabled else NVML_FEATURE_DISABLED
        return [mode, mode]

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, error_type: int, counter_type: int) -> int:
        gpu = self._gpu(handle, "ecc")
        if not gpu.ecc_enabled:
            raise NVMLError_NotSupported()
        corrected = error_type == NVML_MEMORY_ERROR_TYPE_CORRECTED
        if counter_type == NVML_VOLATILE_ECC:
            return gpu.ecc_volatile_corrected if corrected else gpu.ecc_volatile_uncorrected
        return gpu.ecc_aggregate_corrected if corrected else gpu.ecc_aggregate_uncorrected

    def nvmlDeviceGetRetiredPages(self, handle: FakeHandle, cause: int) -> list[int]:
        gpu = self._gpu(handle, "retired_pages")
        count = (
            gpu.retired_double_bit
            if cause == NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
            else gpu.retired_single_bit
        )
        return [0x1000 * (i + 1) for i in range(count)]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: FakeHandle) -> int:
        gpu = self._gpu(handle, "retired_pages")
        return NVML_FEATURE_ENABLED if gpu.retired_pending else NVML_FEATURE_DISABLED

    def nvmlDeviceGetRemappedRows(self, handle: FakeHandle) -> tuple[int, int, int, int]:
        gpu = self._gpu(handle, "remapped_rows")
        return (gpu.remapped_corrected, gpu.remapped_uncorrected, int(gpu.remap_pending),
                int(gpu.remap_failure))

    # -- PCIe ------------------------------------------------------------------

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "pcie").pcie_gen

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "pcie").pcie_max_gen

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "pcie").pcie_width

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "pcie").pcie_max_width

    def nvmlDeviceGetPcieReplayCounter(self, handle: FakeHandle) -> int:
        return self._gpu(handle, "pcie_replay").pcie_replay

    # -- processes ---------------------------------------------------------------

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[FakeProcessInfo]:
        gpu = self._gpu(handle, "processes")
        out = []
        for proc in gpu.processes:
            used = proc.get("used_mib")
            out.append(
                FakeProcessInfo(pid=int(proc["pid"]),
                                usedGpuMemory=None if used is None else int(used * _MIB))
            )
        return out

    # -- events ------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._check_init()
        if not self.events_supported:
            raise NVMLError_NotSupported()
        return FakeEventSet()

    def nvmlDeviceGetSupportedEventTypes(self, handle: FakeHandle) -> int:
        gpu = self._gpu(handle, "events")
        mask = nvmlEventTypeXidCriticalError | nvmlEventTypePState | nvmlEventTypeClock
        if gpu.ecc_enabled and "ecc" not in gpu.unsupported:
            mask |= nvmlEventTypeSingleBitEccError | nvmlEventTypeDoubleBitEccError
        return mask

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, event_types: int, event_set: FakeEventSet) -> None:
        supported = self.nvmlDeviceGetSupportedEventTypes(handle)
        if event_types & ~supported:
            raise NVMLError_NotSupported()
        with self._cond:
            event_set.registrations[handle.index] = (
                event_set.registrations.get(handle.index, 0) | event_types
            )

    def nvmlEventSetWait(self, event_set: FakeEventSet, timeout_ms: int) -> FakeEventData:
        self._check_init()
        deadline = time.monotonic() + timeout_ms / 1000.0
        with self._cond:
            while True:
                self._refresh()
                for i, event in enumerate(self._pending):
                    if event_set.registrations.get(event.gpu, 0) & event.event_type:
                        del self._pending[i]
                        return FakeEventData(FakeHandle(event.gpu), event.event_type, event.data)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NVMLError_Timeout()
                # A file source cannot notify us: look at it again every poll.
                self._cond.wait(min(remaining, self.file_poll_s) if self._source else remaining)

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        event_set.freed = True


# -- the file format -----------------------------------------------------------

_GPU_FIELDS = {f.name for f in dataclasses.fields(FakeGpu)}


def _parse_gpu(index: int, raw: Any) -> FakeGpu:
    if not isinstance(raw, dict):
        raise FakeSourceError(f"gpus[{index}]: expected an object")
    body = dict(raw)
    preset_name = body.pop("preset", "h100_sxm")
    preset = PRESETS.get(preset_name)
    if preset is None:
        raise FakeSourceError(f"gpus[{index}].preset: unknown {preset_name!r}; known: {sorted(PRESETS)}")
    unknown = set(body) - _GPU_FIELDS
    if unknown:
        raise FakeSourceError(f"gpus[{index}]: unknown field(s) {sorted(unknown)}")
    if "unsupported" in body:
        # Listing features adds to what the preset already lacks.
        body["unsupported"] = set(preset().unsupported) | set(body["unsupported"])
    try:
        return preset(**body)
    except FakeSourceError as exc:
        raise FakeSourceError(f"gpus[{index}]: {exc}") from None


def _parse_event(position: int, raw: Any) -> tuple[str, _PendingEvent]:
    if not isinstance(raw, dict) or "gpu" not in raw:
        raise FakeSourceError(f"events[{position}]: expected an object with 'gpu'")
    kind = raw.get("kind", "xid")
    if kind == "xid":
        if "xid" not in raw:
            raise FakeSourceError(f"events[{position}]: an XID event needs 'xid'")
        event = _PendingEvent(int(raw["gpu"]), nvmlEventTypeXidCriticalError, int(raw["xid"]))
    elif kind == "double_bit_ecc":
        event = _PendingEvent(int(raw["gpu"]), nvmlEventTypeDoubleBitEccError, 0)
    else:
        raise FakeSourceError(f"events[{position}].kind: expected 'xid' or 'double_bit_ecc'")
    return str(raw.get("id", position)), event


def _parse_source(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise FakeSourceError("the top level must be an object")
    allowed = {"nvml_error", "driver_version", "cuda_version", "events_supported", "gpus", "events"}
    unknown = set(data) - allowed
    if unknown:
        raise FakeSourceError(f"unknown top-level key(s) {sorted(unknown)}")
    nvml_error = data.get("nvml_error")
    if nvml_error is not None and nvml_error not in ERRORS_BY_NAME:
        raise FakeSourceError(f"nvml_error: unknown error name {nvml_error!r}")
    return {
        "nvml_error": nvml_error,
        "driver_version": str(data.get("driver_version", "550.54.15")),
        "cuda_version": str(data.get("cuda_version", "12.4")),
        "events_supported": bool(data.get("events_supported", True)),
        "gpus": [_parse_gpu(i, g) for i, g in enumerate(data.get("gpus", []))],
        "events": [_parse_event(i, e) for i, e in enumerate(data.get("events", []))],
    }


# -- named scenarios -----------------------------------------------------------


def _healthy_datacenter(clock: Callable[[], float]) -> FakeNvml:
    return FakeNvml([h100_sxm()], clock=clock)


def _consumer_no_ecc(clock: Callable[[], float]) -> FakeNvml:
    return FakeNvml([rtx_4090()], clock=clock)


def _thermal_throttling(clock: Callable[[], float]) -> FakeNvml:
    gpu = h100_sxm(temperature_c=91, slowdown_c=90, shutdown_c=95, power_w=520.0,
                   sm_clock_mhz=1350, gpu_util_pct=100,
                   clock_event_reasons=["hw_thermal_slowdown"],
                   thermal_violation_ns=42_000_000_000)
    return FakeNvml([gpu], clock=clock)


def _power_capped(clock: Callable[[], float]) -> FakeNvml:
    gpu = a100_sxm(power_w=248.0, power_limit_w=250.0, default_power_limit_w=400.0,
                   sm_clock_mhz=1095, gpu_util_pct=100, clock_event_reasons=["sw_power_cap"],
                   power_violation_ns=120_000_000_000)
    return FakeNvml([gpu], clock=clock)


def _pcie_x8_on_x16(clock: Callable[[], float]) -> FakeNvml:
    gpu = a100_sxm(pcie_gen=3, pcie_max_gen=4, pcie_width=8, pcie_max_width=16,
                   gpu_util_pct=97, power_w=310.0)
    return FakeNvml([gpu], clock=clock)


def _xid_79(clock: Callable[[], float]) -> FakeNvml:
    fake = FakeNvml([h100_sxm()], clock=clock)
    fake.inject_xid(0, 79)
    return fake


def _gpu_lost(clock: Callable[[], float]) -> FakeNvml:
    return FakeNvml([h100_sxm(), h100_sxm(serial="1650923054321", lost=True)], clock=clock)


def _no_driver(clock: Callable[[], float]) -> FakeNvml:
    return FakeNvml([], init_error="driver_not_loaded", clock=clock)


SCENARIOS: dict[str, Callable[[Callable[[], float]], FakeNvml]] = {
    "healthy_datacenter": _healthy_datacenter,
    "consumer_no_ecc": _consumer_no_ecc,
    "thermal_throttling": _thermal_throttling,
    "power_capped": _power_capped,
    "pcie_x8_on_x16": _pcie_x8_on_x16,
    "xid_79": _xid_79,
    "gpu_lost": _gpu_lost,
    "no_driver": _no_driver,
}


def scenario(name: str, *, clock: Callable[[], float] = time.monotonic) -> FakeNvml:
    """A fresh fake for one of ``SCENARIOS``."""
    try:
        factory = SCENARIOS[name]
    except KeyError:
        raise FakeSourceError(f"unknown scenario {name!r}; known: {sorted(SCENARIOS)}") from None
    return factory(clock)
