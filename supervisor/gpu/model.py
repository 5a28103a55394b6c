"""Plain typed records for GPU state, events and verdicts.

Everything here is data: no NVML calls, no I/O. Units are converted where data
enters (``nvml.py``), so every field below is already in the unit its name says
(``_w`` watts, ``_c`` degrees Celsius, ``_mhz``, ``_mib``, ``_s`` seconds).
``None`` always means "not supported or not readable on this GPU", never zero.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Collection


def _plain(value: Any) -> Any:
    """Turn dataclasses, enums and tuples into JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple, frozenset, set)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class _Record:
    """Mixin: ``to_dict()`` for JSON output."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


class NvmlState(str, enum.Enum):
    """Whether NVML could be used at all on this host."""

    AVAILABLE = "available"
    NO_DRIVER = "no_driver"  # libnvidia-ml missing or the kernel driver not loaded
    ERROR = "error"  # NVML present but initialisation failed for another reason


class GpuState(str, enum.Enum):
    """Whether one GPU could be read."""

    AVAILABLE = "available"
    LOST = "lost"  # NVML says the GPU is lost or needs a reset
    UNAVAILABLE = "unavailable"  # no handle for it, for another reason


class ClockEventReason(str, enum.Enum):
    """Why the clocks are below their maximum (NVML "clock event reasons")."""

    GPU_IDLE = "gpu_idle"
    APPLICATIONS_CLOCKS = "applications_clocks"
    SW_POWER_CAP = "sw_power_cap"
    HW_SLOWDOWN = "hw_slowdown"
    SYNC_BOOST = "sync_boost"
    SW_THERMAL_SLOWDOWN = "sw_thermal_slowdown"
    HW_THERMAL_SLOWDOWN = "hw_thermal_slowdown"
    HW_POWER_BRAKE = "hw_power_brake"
    DISPLAY_CLOCKS = "display_clocks"

    @property
    def label(self) -> str:
        return _REASON_LABELS[self]


_REASON_LABELS = {
    ClockEventReason.GPU_IDLE: "idle",
    ClockEventReason.APPLICATIONS_CLOCKS: "applications clocks",
    ClockEventReason.SW_POWER_CAP: "SW power cap",
    ClockEventReason.HW_SLOWDOWN: "HW slowdown",
    ClockEventReason.SYNC_BOOST: "sync boost",
    ClockEventReason.SW_THERMAL_SLOWDOWN: "SW thermal slowdown",
    ClockEventReason.HW_THERMAL_SLOWDOWN: "HW thermal slowdown",
    ClockEventReason.HW_POWER_BRAKE: "HW power brake",
    ClockEventReason.DISPLAY_CLOCKS: "display clocks",
}


class Severity(str, enum.Enum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class EventKind(str, enum.Enum):
    XID = "xid"
    DOUBLE_BIT_ECC = "double_bit_ecc"


class HealthLevel(str, enum.Enum):
    """Ordered: ``ok < degraded < unhealthy`` (compare with ``rank``)."""

    OK = "ok"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"

    @property
    def rank(self) -> int:
        return _LEVEL_RANK[self]


_LEVEL_RANK = {HealthLevel.OK: 0, HealthLevel.DEGRADED: 1, HealthLevel.UNHEALTHY: 2}


@dataclass(frozen=True)
class NvmlStatus(_Record):
    state: NvmlState
    error: str | None = None  # NVML's own message when state is not AVAILABLE

    @property
    def available(self) -> bool:
        return self.state is NvmlState.AVAILABLE


@dataclass(frozen=True)
class Temperature(_Record):
    current_c: float | None = None
    slowdown_c: float | None = None  # the GPU starts slowing its clocks here
    shutdown_c: float | None = None  # the GPU turns itself off here


@dataclass(frozen=True)
class Power(_Record):
    draw_w: float | None = None
    enforced_limit_w: float | None = None  # what the GPU obeys now
    default_limit_w: float | None = None  # what the board ships with
    energy_mj: int | None = None  # NVML's total-energy counter since driver load (mJ)


@dataclass(frozen=True)
class Clocks(_Record):
    sm_mhz: float | None = None
    sm_max_mhz: float | None = None
    mem_mhz: float | None = None
    mem_max_mhz: float | None = None
    pstate: str | None = None  # "P0" (fastest) .. "P15"
    event_reasons: tuple[ClockEventReason, ...] | None = None  # None: not supported
    event_mask: int | None = None  # the raw bitmask, for anything not decoded
    power_throttle_s: float | None = None  # accumulated time held back by power
    thermal_throttle_s: float | None = None  # accumulated time held back by heat


@dataclass(frozen=True)
class Utilization(_Record):
    gpu_pct: float | None = None
    memory_pct: float | None = None


@dataclass(frozen=True)
class Memory(_Record):
    used_mib: float | None = None
    total_mib: float | None = None


@dataclass(frozen=True)
class Ecc(_Record):
    enabled: bool | None = None  # None: the board has no ECC (consumer cards)
    volatile_corrected: int | None = None  # since the last driver load / reset
    volatile_uncorrected: int | None = None
    aggregate_corrected: int | None = None  # lifetime of the board
    aggregate_uncorrected: int | None = None


@dataclass(frozen=True)
class RetiredPages(_Record):
    """Page retirement, the pre-Ampere way to fence off bad memory."""

    single_bit: int | None = None
    double_bit: int | None = None
    pending: bool | None = None  # takes effect at the next driver reload

    @property
    def total(self) -> int | None:
        if self.single_bit is None and self.double_bit is None:
            return None
        return (self.single_bit or 0) + (self.double_bit or 0)


@dataclass(frozen=True)
class RemappedRows(_Record):
    """Row remapping, Ampere and newer."""

    corrected: int | None = None
    uncorrected: int | None = None
    pending: bool | None = None  # a GPU reset is needed to apply a remap
    failure: bool | None = None  # a remap failed: the board needs service


@dataclass(frozen=True)
class Pcie(_Record):
    gen: int | None = None
    max_gen: int | None = None  # the best link both the GPU and its slot support
    width: int | None = None
    max_width: int | None = None
    replay_counter: int | None = None


@dataclass(frozen=True)
class GpuProcess(_Record):
    pid: int
    used_mib: float | None = None
    ours: bool | None = None  # None: no set of our pids was given


@dataclass(frozen=True)
class GpuRecord(_Record):
    index: int
    state: GpuState = GpuState.AVAILABLE
    error: str | None = None  # why the GPU could not be read
    name: str | None = None
    uuid: str | None = None
    serial: str | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    temperature: Temperature = field(default_factory=Temperature)
    power: Power = field(default_factory=Power)
    clocks: Clocks = field(default_factory=Clocks)
    utilization: Utilization = field(default_factory=Utilization)
    memory: Memory = field(default_factory=Memory)
    ecc: Ecc = field(default_factory=Ecc)
    retired_pages: RetiredPages = field(default_factory=RetiredPages)
    remapped_rows: RemappedRows = field(default_factory=RemappedRows)
    pcie: Pcie = field(default_factory=Pcie)
    processes: tuple[GpuProcess, ...] | None = None
    # Fields that failed with an error other than "not supported", by name:
    # shown for diagnosis, never used for a verdict.
    field_errors: dict[str, str] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.state is GpuState.AVAILABLE

    @property
    def foreign_processes(self) -> tuple[GpuProcess, ...]:
        return tuple(p for p in self.processes or () if p.ours is False)


@dataclass(frozen=True)
class GpuSnapshot(_Record):
    """One reading of every GPU on the host."""

    taken_at: float  # wall clock (time.time())
    monotonic: float  # time.monotonic() at the reading; windows use this
    status: NvmlStatus
    driver_version: str | None = None
    cuda_version: str | None = None
    gpus: tuple[GpuRecord, ...] = ()

    def gpu(self, index: int) -> GpuRecord | None:
        for record in self.gpus:
            if record.index == index:
                return record
        return None

    def with_our_pids(self, our_pids: Collection[int] | None) -> "GpuSnapshot":
        """The same snapshot with each process flagged ours / not ours.

        Kept apart from the NVML read so that one read can serve callers with
        different process trees (and so the read itself needs no arguments).
        """
        if our_pids is None:
            return self
        ours = frozenset(our_pids)
        gpus = tuple(
            record if record.processes is None else dataclasses.replace(
                record,
                processes=tuple(dataclasses.replace(p, ours=p.pid in ours) for p in record.processes),
            )
            for record in self.gpus
        )
        return dataclasses.replace(self, gpus=gpus)


@dataclass(frozen=True)
class GpuEvent(_Record):
    """An XID or double-bit ECC event delivered by NVML."""

    time: float  # wall clock
    monotonic: float
    gpu_index: int | None  # None when NVML's device could not be mapped to an index
    kind: EventKind
    xid: int | None
    meaning: str
    severity: Severity


@dataclass(frozen=True)
class GpuVerdict(_Record):
    level: HealthLevel
    reasons: list[str] = field(default_factory=list)  # why the level is not ok
    notes: list[str] = field(default_factory=list)  # worth showing, not counted

    @property
    def ok(self) -> bool:
        return self.level is HealthLevel.OK
