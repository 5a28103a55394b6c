"""Periodic GPU samples in a bounded ring, and telemetry over a time window.

Times are ``time.monotonic()`` seconds, taken from each snapshot, so a job
can do ``t0 = time.monotonic(); ...; sampler.window(t0, time.monotonic())``.

Energy over a window comes from NVML's total-energy counter when every sample
involved has it (the counter is exact between samples), and otherwise from
integrating the power draw, taken as a straight line between samples. Either
way the samples either side of the window are used to interpolate its edges,
so a job shorter than the sampling interval still gets a sensible figure.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

from .errors import GpuReadTimeout
from .model import ClockEventReason, GpuRecord, GpuSnapshot, _Record
from .nvml import AsyncNvmlReader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuTelemetry(_Record):
    index: int
    samples: int  # samples the means and peaks are taken over
    mean_temperature_c: float | None = None
    peak_temperature_c: float | None = None
    mean_power_w: float | None = None
    peak_power_w: float | None = None
    mean_sm_clock_mhz: float | None = None
    mean_utilization_pct: float | None = None
    reasons_seen: tuple[ClockEventReason, ...] = ()
    energy_j: float | None = None
    energy_source: str | None = None  # "counter" or "integrated"
    covered_s: float = 0.0  # the part of the window the energy figure covers


@dataclass(frozen=True)
class TelemetryWindow(_Record):
    since: float
    until: float
    gpus: tuple[GpuTelemetry, ...] = ()

    def gpu(self, index: int) -> GpuTelemetry | None:
        return next((g for g in self.gpus if g.index == index), None)


@dataclass(frozen=True)
class GpuTrend(_Record):
    index: int
    samples: int
    temperature_slope_c_per_min: float | None = None  # least-squares slope
    peak_temperature_c: float | None = None
    mean_power_w: float | None = None
    # Share of the samples (0..1) in which each clock-event reason was active.
    reason_fraction: dict[str, float] = field(default_factory=dict)


_Point = tuple[float, GpuRecord]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _interpolate(points: Sequence[tuple[float, float]], at: float) -> float:
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t0 <= at <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (at - t0) / (t1 - t0)
    return points[0][1] if at < points[0][0] else points[-1][1]


def _integrate(points: Sequence[tuple[float, float]], a: float, b: float) -> float:
    """Area under the straight lines through ``points``, between a and b."""
    total = 0.0
    for (t0, _), (t1, _) in zip(points, points[1:]):
        lo, hi = max(a, t0), min(b, t1)
        if hi > lo:
            total += (_interpolate(points, lo) + _interpolate(points, hi)) / 2.0 * (hi - lo)
    return total


def _energy(points: Sequence[_Point], since: float, until: float) -> tuple[float | None, str | None, float]:
    counter = [(t, float(r.power.energy_mj)) for t, r in points if r.power.energy_mj is not None]
    if len(counter) == len(points) >= 2 and all(
        b[1] >= a[1] for a, b in zip(counter, counter[1:])  # a reset counter is no use
    ):
        a, b = max(since, counter[0][0]), min(until, counter[-1][0])
        if b > a:
            return (_interpolate(counter, b) - _interpolate(counter, a)) / 1000.0, "counter", b - a
    power = [(t, r.power.draw_w) for t, r in points if r.power.draw_w is not None]
    if len(power) >= 2:
        a, b = max(since, power[0][0]), min(until, power[-1][0])
        if b > a:
            return _integrate(power, a, b), "integrated", b - a  # type: ignore[arg-type]
    return None, None, 0.0


def _telemetry(index: int, series: list[_Point], since: float, until: float) -> GpuTelemetry:
    inside = [p for p in series if since <= p[0] <= until]
    before = [p for p in series if p[0] < since]
    after = [p for p in series if p[0] > until]
    # A window shorter than the interval may hold no sample: the one just
    # before it describes the state the window started in.
    stats = inside or before[-1:]
    temps = [r.temperature.current_c for _, r in stats if r.temperature.current_c is not None]
    powers = [r.power.draw_w for _, r in stats if r.power.draw_w is not None]
    clocks = [r.clocks.sm_mhz for _, r in stats if r.clocks.sm_mhz is not None]
    utils = [r.utilization.gpu_pct for _, r in stats if r.utilization.gpu_pct is not None]
    seen = {reason for _, r in stats for reason in r.clocks.event_reasons or ()}
    energy, source, covered = _energy(before[-1:] + inside + after[:1], since, until)
    return GpuTelemetry(
        index=index,
        samples=len(stats),
        mean_temperature_c=_mean(temps),
        peak_temperature_c=max(temps) if temps else None,
        mean_power_w=_mean(powers),
        peak_power_w=max(powers) if powers else None,
        mean_sm_clock_mhz=_mean(clocks),
        mean_utilization_pct=_mean(utils),
        reasons_seen=tuple(r for r in ClockEventReason if r in seen),
        energy_j=energy,
        energy_source=source,
        covered_s=covered,
    )


class GpuSampler:
    """Samples every ``interval_s`` into a ring of ``capacity`` snapshots."""

    def __init__(
        self,
        reader: AsyncNvmlReader,
        *,
        interval_s: float = 5.0,
        capacity: int = 720,
        our_pids: Callable[[], Collection[int] | None] | None = None,
        on_sample: Callable[[GpuSnapshot], None] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._reader = reader
        self.interval_s = interval_s
        self._ring: deque[GpuSnapshot] = deque(maxlen=capacity)
        self._our_pids = our_pids
        self._on_sample = on_sample
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self.running:
            return
        self._task = asyncio.create_task(self._run(), name="gpu-sampler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self.sample_once()
            # Keep to the grid; after a slow read, skip the missed ticks.
            next_at += self.interval_s
            now = loop.time()
            if next_at < now:
                next_at = now
            await asyncio.sleep(next_at - now)

    async def sample_once(self) -> GpuSnapshot | None:
        """Take one sample now and keep it; None if the read timed out."""
        pids = self._our_pids() if self._our_pids is not None else None
        try:
            snap = await self._reader.snapshot(pids)
        except GpuReadTimeout as exc:
            log.warning("GPU sample skipped: %s", exc)
            return None
        except Exception:  # a bug in a reading must not end the sampling
            log.exception("GPU sample failed")
            return None
        self.add(snap)
        return snap

    def add(self, snapshot: GpuSnapshot) -> None:
        self._ring.append(snapshot)
        if self._on_sample is not None:
            try:
                self._on_sample(snapshot)
            except Exception:
                log.exception("GPU sample callback failed")

    # -- reading -------------------------------------------------------------------

    def latest(self) -> GpuSnapshot | None:
        return self._ring[-1] if self._ring else None

    def recent(self, n: int) -> list[GpuSnapshot]:
        return list(self._ring)[-n:] if n > 0 else []

    def _series(self) -> dict[int, list[_Point]]:
        series: dict[int, list[_Point]] = {}
        for snap in self._ring:
            for record in snap.gpus:
                if record.available:
                    series.setdefault(record.index, []).append((snap.monotonic, record))
        return series

    def window(self, since: float, until: float | None = None) -> TelemetryWindow:
        """Telemetry per GPU between two ``time.monotonic()`` values (until: latest)."""
        if until is None:
            latest = self.latest()
            until = latest.monotonic if latest is not None else since
        if until < since:
            raise ValueError("window: until is before since")
        gpus = tuple(
            _telemetry(index, points, since, until)
            for index, points in sorted(self._series().items())
            if any(t <= until for t, _ in points)
        )
        return TelemetryWindow(since=since, until=until, gpus=gpus)

    def trend(self, index: int, last_n: int = 12) -> GpuTrend | None:
        """How one GPU has been doing over its last ``last_n`` samples."""
        points = self._series().get(index, [])[-last_n:]
        if not points:
            return None
        temps = [(t, r.temperature.current_c) for t, r in points if r.temperature.current_c is not None]
        slope = None
        if len(temps) >= 2:
            mt = sum(t for t, _ in temps) / len(temps)
            mv = sum(v for _, v in temps) / len(temps)
            var = sum((t - mt) ** 2 for t, _ in temps)
            if var > 0:
                slope = sum((t - mt) * (v - mv) for t, v in temps) / var * 60.0
        counts: dict[str, int] = {}
        for _, r in points:
            for reason in r.clocks.event_reasons or ():
                counts[reason.value] = counts.get(reason.value, 0) + 1
        powers = [r.power.draw_w for _, r in points if r.power.draw_w is not None]
        return GpuTrend(
            index=index,
            samples=len(points),
            temperature_slope_c_per_min=slope,
            peak_temperature_c=max((v for _, v in temps), default=None),
            mean_power_w=_mean(powers),
            reason_fraction={k: v / len(points) for k, v in sorted(counts.items())},
        )
