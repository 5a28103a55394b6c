"""What the benchmark needs to know about the GPU, and where it gets it from.

The runner talks to a small :class:`TelemetrySource`; the daemon passes
:class:`SamplerTelemetry` (over ``supervisor.gpu.GpuSampler``), tests and GPU-less hosts pass
:class:`NullTelemetry` or a fake. Records from the source are copied into this module's own
plain dataclasses (:class:`GpuInfo`, :class:`TelemetrySummary`) at the boundary, so a report can
be written to JSON and read back without the supervisor's types. The copy reads attributes by
name (``GpuRecord`` and ``GpuTelemetry`` shapes), so any object with those names will do.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

# Clock-event reasons that slow a GPU down for a physical reason (the other reasons, such as
# idle or application clocks, are not a fault). Values as supervisor.gpu.ClockEventReason.
THERMAL_REASONS = frozenset({"hw_thermal_slowdown", "sw_thermal_slowdown", "hw_slowdown"})
POWER_REASONS = frozenset({"sw_power_cap", "hw_power_brake"})
REASON_LABELS = {
    "gpu_idle": "idle",
    "applications_clocks": "applications clocks",
    "sw_power_cap": "SW power cap",
    "hw_slowdown": "HW slowdown",
    "sync_boost": "sync boost",
    "sw_thermal_slowdown": "SW thermal slowdown",
    "hw_thermal_slowdown": "HW thermal slowdown",
    "hw_power_brake": "HW power brake",
    "display_clocks": "display clocks",
}


def reason_label(value: str) -> str:
    return REASON_LABELS.get(value, value.replace("_", " "))


@dataclass(frozen=True)
class GpuProcessInfo:
    pid: int
    used_mib: float | None = None
    ours: bool | None = None  # None: unknown whether it belongs to this worker


@dataclass(frozen=True)
class GpuInfo:
    """The facts about the benchmarked GPU that a verdict uses (``None``: not readable)."""

    index: int | None = None
    name: str | None = None
    uuid: str | None = None
    driver_version: str | None = None
    enforced_power_limit_w: float | None = None
    default_power_limit_w: float | None = None
    sm_max_mhz: float | None = None
    pcie_gen: int | None = None
    pcie_max_gen: int | None = None
    pcie_width: int | None = None
    pcie_max_width: int | None = None
    # NVML's accumulated throttle counters, seconds since driver load.
    power_throttle_s: float | None = None
    thermal_throttle_s: float | None = None
    processes: tuple[GpuProcessInfo, ...] | None = None

    @classmethod
    def from_record(cls, record: Any) -> "GpuInfo":
        """Copy a ``supervisor.gpu.GpuRecord`` (or anything shaped like one)."""
        power = getattr(record, "power", None)
        clocks = getattr(record, "clocks", None)
        pcie = getattr(record, "pcie", None)
        raw_processes = getattr(record, "processes", None)
        processes = None
        if raw_processes is not None:
            processes = tuple(
                GpuProcessInfo(pid=int(getattr(p, "pid", 0)), used_mib=getattr(p, "used_mib", None),
                               ours=getattr(p, "ours", None))
                for p in raw_processes
            )
        return cls(
            index=getattr(record, "index", None),
            name=getattr(record, "name", None),
            uuid=getattr(record, "uuid", None),
            driver_version=getattr(record, "driver_version", None),
            enforced_power_limit_w=getattr(power, "enforced_limit_w", None),
            default_power_limit_w=getattr(power, "default_limit_w", None),
            sm_max_mhz=getattr(clocks, "sm_max_mhz", None),
            pcie_gen=getattr(pcie, "gen", None),
            pcie_max_gen=getattr(pcie, "max_gen", None),
            pcie_width=getattr(pcie, "width", None),
            pcie_max_width=getattr(pcie, "max_width", None),
            power_throttle_s=getattr(clocks, "power_throttle_s", None),
            thermal_throttle_s=getattr(clocks, "thermal_throttle_s", None),
            processes=processes,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GpuInfo":
        values = {f.name: data.get(f.name) for f in dataclasses.fields(cls)}
        if values["processes"] is not None:
            values["processes"] = tuple(GpuProcessInfo(**p) for p in values["processes"])
        return cls(**values)


@dataclass(frozen=True)
class TelemetrySummary:
    """GPU telemetry over one time window (a run, or all measured runs)."""

    samples: int = 0
    mean_temperature_c: float | None = None
    peak_temperature_c: float | None = None
    mean_power_w: float | None = None
    mean_sm_clock_mhz: float | None = None
    mean_utilization_pct: float | None = None
    reasons_seen: tuple[str, ...] = ()  # clock-event reason values, e.g. "hw_thermal_slowdown"
    energy_j: float | None = None

    @classmethod
    def from_telemetry(cls, item: Any) -> "TelemetrySummary":
        """Copy a ``supervisor.gpu.GpuTelemetry`` (or anything shaped like one)."""
        reasons = []
        for reason in getattr(item, "reasons_seen", ()) or ():
            reasons.append(str(getattr(reason, "value", reason)))
        return cls(
            samples=int(getattr(item, "samples", 0) or 0),
            mean_temperature_c=getattr(item, "mean_temperature_c", None),
            peak_temperature_c=getattr(item, "peak_temperature_c", None),
            mean_power_w=getattr(item, "mean_power_w", None),
            mean_sm_clock_mhz=getattr(item, "mean_sm_clock_mhz", None),
            mean_utilization_pct=getattr(item, "mean_utilization_pct", None),
            reasons_seen=tuple(reasons),
            energy_j=getattr(item, "energy_j", None),
        )

    @property
    def reason_labels(self) -> list[str]:
        return [reason_label(r) for r in self.reasons_seen]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TelemetrySummary":
        values = {f.name: data.get(f.name) for f in dataclasses.fields(cls) if f.name in data}
        values["reasons_seen"] = tuple(values.get("reasons_seen") or ())
        return cls(**values)


@runtime_checkable
class TelemetrySource(Protocol):
    """The GPU side of a benchmark. All times are ``time.monotonic()`` seconds.

    ``gpu()`` returns the GPU ComfyUI runs on (a ``GpuRecord``-shaped object), or None when
    there is none or it cannot be read. ``mark()`` is called at the start and end of every run
    so that short runs still get a sample of their own (a no-op is fine). ``window()`` returns
    the telemetry of that GPU between two instants (a ``GpuTelemetry``-shaped object), or None.
    """

    async def gpu(self) -> Any | None: ...

    async def mark(self) -> None: ...

    async def window(self, since: float, until: float) -> Any | None: ...


class NullTelemetry:
    """No GPU telemetry at all (a host without NVML, or a test that does not need it)."""

    async def gpu(self) -> None:
        return None

    async def mark(self) -> None:
        return None

    async def window(self, since: float, until: float) -> None:
        return None


class SamplerTelemetry:
    """A :class:`TelemetrySource` over ``supervisor.gpu.GpuSampler`` for GPU ``index``.

    ``mark()`` takes an extra sample through the sampler, so a run shorter than the sampling
    interval is still covered; set ``mark_samples=False`` to rely on the periodic ones only.
    """

    def __init__(self, sampler: Any, index: int = 0, *, mark_samples: bool = True) -> None:
        self._sampler = sampler
        self.index = index
        self._mark_samples = mark_samples

    async def gpu(self) -> Any | None:
        snapshot = self._sampler.latest()
        if snapshot is None:
            snapshot = await self._sampler.sample_once()
        if snapshot is None:
            return None
        record = snapshot.gpu(self.index)
        if record is None or not getattr(record, "available", True):
            return None
        return record

    async def mark(self) -> None:
        if self._mark_samples:
            try:
                await self._sampler.sample_once()
            except Exception as exc:  # telemetry must never fail a benchmark
                logger.warning("benchmark: extra GPU sample failed: %s", exc)

    async def window(self, since: float, until: float) -> Any | None:
        return self._sampler.window(since, until).gpu(self.index)


async def read_gpu(source: TelemetrySource) -> GpuInfo | None:
    """The source's GPU as :class:`GpuInfo`; None (and a log line) when it cannot be read."""
    try:
        record = await source.gpu()
    except Exception as exc:
        logger.warning("benchmark: reading the GPU failed: %s", exc)
        return None
    return GpuInfo.from_record(record) if record is not None else None


async def read_window(source: TelemetrySource, since: float, until: float) -> TelemetrySummary | None:
    try:
        item = await source.window(since, until)
    except Exception as exc:
        logger.warning("benchmark: reading GPU telemetry failed: %s", exc)
        return None
    return TelemetrySummary.from_telemetry(item) if item is not None else None
