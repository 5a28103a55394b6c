"""The daemon's view of the GPUs: samples, events and the policy's verdict, in one object.

It joins the pieces of `supervisor.gpu` (reader, XID watcher, sampler, policy) and turns their
verdict into the worker's `Verdict`, its gauges and its snapshot. Everything NVML runs off the
event loop (the sampler uses threads; the watcher is a thread of its own).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Iterable

from prometheus_client.core import Metric

from benchmark.telemetry import NullTelemetry, SamplerTelemetry, TelemetrySource
from config import Settings
from supervisor.gpu import (
    AsyncNvmlReader,
    EventKind,
    GpuEvent,
    GpuPolicyThresholds,
    GpuSampler,
    GpuSnapshot,
    HealthLevel,
    NvmlReader,
    Severity,
    XidEventWatcher,
    evaluate,
)
from supervisor.gpu.families import gpu_families
from supervisor.state import Level, Verdict

logger = logging.getLogger(__name__)

#: How far back the snapshot's per-GPU history reaches (`comfy-worker health --watch` draws it).
HISTORY_SECONDS = 300.0
_LEVELS = {HealthLevel.OK: Level.OK, HealthLevel.DEGRADED: Level.DEGRADED,
           HealthLevel.UNHEALTHY: Level.UNHEALTHY}


class GpuMonitor:
    def __init__(self, settings: Settings, reader: NvmlReader | None = None):
        g = settings.gpu
        self.required = g.required
        self.thresholds = GpuPolicyThresholds(temp_margin_c=g.temp_margin_c,
                                              power_cap_ratio=g.power_cap_ratio,
                                              pcie_busy_util_pct=g.busy_utilization)
        self.reader = reader or NvmlReader(fake_source=g.fake_source)
        self.watcher = XidEventWatcher(self.reader, on_event=self._count_event)
        self._event_lock = threading.Lock()
        self._xid_counts: dict[tuple[str, str, str], int] = {}
        self._ecc_event_counts: dict[str, int] = {}
        self.our_pids: Callable[[], set[int]] = lambda: set()
        self.sampler = GpuSampler(AsyncNvmlReader(self.reader), interval_s=g.sample_interval,
                                  capacity=g.history_size, our_pids=lambda: self.our_pids(),
                                  on_sample=self._on_sample)
        self._verdict = Verdict(Level.OK, ("GPU not read yet",)) if not self.required else \
            Verdict(Level.UNHEALTHY, ("GPU not read yet",))
        self._detail: Any = None
        self._per_gpu: dict[int, Verdict] = {}
        self.on_change: Callable[[], None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> "GpuMonitor":
        return cls(settings)

    async def start(self) -> None:
        self.watcher.start()
        await self.sampler.start()
        await self.sampler.sample_once()

    async def stop(self) -> None:
        await self.sampler.stop()
        await self.watcher.astop()
        self.reader.close()

    def _on_sample(self, snapshot: GpuSnapshot) -> None:
        detail = evaluate(snapshot, self.watcher.events(), required=self.required,
                          thresholds=self.thresholds)
        verdict = Verdict(_LEVELS[detail.level], tuple(detail.reasons))
        changed = verdict != self._verdict
        self._verdict, self._detail = verdict, detail
        per_gpu = self._judge_each(snapshot)
        if per_gpu != self._per_gpu:
            changed = True
            for index, one in per_gpu.items():
                if one != self._per_gpu.get(index):
                    logger.debug("GPU %d verdict: %s %s", index, one.level.value, one.reason)
            self._per_gpu = per_gpu
        if changed:
            logger.info("GPU verdict: %s%s", verdict.level.value,
                        f" ({verdict.reason})" if verdict.reasons else "")
            if self.on_change:
                self.on_change()

    def _judge_each(self, snapshot: GpuSnapshot) -> dict[int, Verdict]:
        """Each GPU on its own, with the events of that GPU (and those no GPU claims): what
        one instance pinned to it is judged by."""
        if not snapshot.status.available:
            return {}
        events = self.watcher.events()
        out = {}
        for record in snapshot.gpus:
            mine = [e for e in events if e.gpu_index in (None, record.index)]
            detail = evaluate(dataclasses.replace(snapshot, gpus=(record,)), mine,
                              required=self.required, thresholds=self.thresholds)
            out[record.index] = Verdict(_LEVELS[detail.level], tuple(detail.reasons))
        return out

    def verdict(self, index: int | None = None) -> Verdict:
        """The host's verdict, or with `index` that GPU's alone (unread: the host's)."""
        if index is None:
            return self._verdict
        return self._per_gpu.get(index, self._verdict)

    @property
    def available(self) -> bool:
        """NVML answered: the GPUs can be read (not a host without a driver)."""
        return self.reader.status().available

    def telemetry(self, index: int | None) -> TelemetrySource:
        """The telemetry of GPU `index` (None: the first) for a benchmark; none without NVML."""
        if not self.available:
            return NullTelemetry()
        return SamplerTelemetry(self.sampler, index or 0)

    def critical(self, index: int | None = None) -> tuple[str, ...]:
        """Critical events (an XID or a double-bit ECC error the policy calls critical) of GPU
        `index` (None: of any GPU), and those no GPU claims: what a restart does not heal."""
        found: dict[str, None] = {}
        for event in self.watcher.events():
            if event.severity is not Severity.CRITICAL:
                continue
            if index is not None and event.gpu_index not in (None, index):
                continue
            what = f"XID {event.xid} ({event.meaning})" if event.kind is EventKind.XID \
                else event.meaning
            gpu = "?" if event.gpu_index is None else event.gpu_index
            found[f"GPU {gpu}: {what}"] = None
        return tuple(found)

    def verdict_summary(self) -> dict[str, Any]:
        return {"level": self._verdict.level.value, "reasons": list(self._verdict.reasons),
                "notes": list(self._detail.notes) if self._detail else []}

    def window(self, since: float, until: float | None = None):
        return self.sampler.window(since, until)

    def latest(self) -> GpuSnapshot | None:
        return self.sampler.latest()

    def _count_event(self, event: GpuEvent) -> None:
        """Called in the watcher thread: counts for /metrics (the watcher's history is bounded)."""
        gpu = "" if event.gpu_index is None else str(event.gpu_index)
        with self._event_lock:
            if event.kind is EventKind.XID:
                key = (gpu, str(event.xid), event.severity.value)
                self._xid_counts[key] = self._xid_counts.get(key, 0) + 1
            else:
                self._ecc_event_counts[gpu] = self._ecc_event_counts.get(gpu, 0) + 1

    def metric_families(self) -> Iterable[Metric]:
        """A `WorkerMetrics` source: the latest sample, the verdict and the event counts."""
        with self._event_lock:
            xids, ecc = dict(self._xid_counts), dict(self._ecc_event_counts)
        level = {Level.OK: 0, Level.DEGRADED: 1, Level.UNHEALTHY: 2}[self._verdict.level]
        return gpu_families(self.sampler.latest(), level, xids, ecc)

    def history(self, seconds: float, points: int = 60) -> dict[str, dict[str, list]]:
        """Per GPU, the last `seconds` of temperature, power and SM clock, at most `points`
        each (evenly thinned), oldest first: what `comfy-worker health --watch` draws."""
        latest = self.sampler.latest()
        if latest is None:
            return {}
        since = latest.monotonic - seconds
        snaps = [s for s in self.sampler.recent(1_000_000) if s.monotonic >= since]
        if len(snaps) > points:
            step = len(snaps) / points
            snaps = [snaps[int(k * step)] for k in range(points - 1)] + [snaps[-1]]
        out: dict[str, dict[str, list]] = {}
        for snap in snaps:
            for gpu in snap.gpus:
                if not gpu.available:
                    continue
                series = out.setdefault(str(gpu.index), {
                    "age_s": [], "temperature_c": [], "power_w": [], "sm_clock_mhz": [],
                    "slowdown_c": gpu.temperature.slowdown_c,
                    "power_limit_w": gpu.power.enforced_limit_w,
                    "sm_clock_max_mhz": gpu.clocks.sm_max_mhz})
                series["age_s"].append(round(latest.monotonic - snap.monotonic, 1))
                series["temperature_c"].append(gpu.temperature.current_c)
                series["power_w"].append(gpu.power.draw_w)
                series["sm_clock_mhz"].append(gpu.clocks.sm_mhz)
        return out

    def snapshot(self) -> dict[str, Any]:
        latest = self.sampler.latest()
        trends = {}
        if latest is not None:
            for gpu in latest.gpus:
                trend = self.sampler.trend(gpu.index)
                if trend is not None:
                    trends[str(gpu.index)] = trend.to_dict() if hasattr(trend, "to_dict") else \
                        str(trend)
        return {
            "verdict": self.verdict_summary(),
            "required": self.required,
            "snapshot": latest.to_dict() if latest else None,
            "age_s": round(time.monotonic() - latest.monotonic, 1) if latest else None,
            "events": [e.to_dict() for e in self.watcher.events()][-20:],
            "event_watch": self.watcher.status().to_dict()
            if hasattr(self.watcher.status(), "to_dict") else str(self.watcher.status()),
            "trends": trends,
            "history": self.history(HISTORY_SECONDS),
        }

