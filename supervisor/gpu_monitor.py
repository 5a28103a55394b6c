"""The daemon's view of the GPUs: samples, events and the policy's verdict, in one object.

It joins the pieces of `supervisor.gpu` (reader, XID watcher, sampler, policy) and turns their
verdict into the worker's `Verdict`, its gauges and its snapshot. Everything NVML runs off the
event loop (the sampler uses threads; the watcher is a thread of its own).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import psutil

from config import Settings
from supervisor.gpu import (
    AsyncNvmlReader,
    GpuPolicyThresholds,
    GpuSampler,
    GpuSnapshot,
    HealthLevel,
    NvmlReader,
    XidEventWatcher,
    evaluate,
)
from supervisor.state import Level, Verdict

logger = logging.getLogger(__name__)

_LEVELS = {HealthLevel.OK: Level.OK, HealthLevel.DEGRADED: Level.DEGRADED,
           HealthLevel.UNHEALTHY: Level.UNHEALTHY}
_THROTTLES = {"hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake",
              "sw_power_cap"}


def process_tree(pid: int | None) -> set[int]:
    """A process and all its descendants (ComfyUI's workers count as ComfyUI)."""
    if not pid:
        return set()
    try:
        root = psutil.Process(pid)
        return {pid} | {child.pid for child in root.children(recursive=True)}
    except psutil.Error:
        return {pid}


class GpuMonitor:
    def __init__(self, settings: Settings, reader: NvmlReader | None = None):
        g = settings.gpu
        self.required = g.required
        self.thresholds = GpuPolicyThresholds(temp_margin_c=g.temp_margin_c,
                                              power_cap_ratio=g.power_cap_ratio,
                                              pcie_busy_util_pct=g.busy_utilization)
        self.reader = reader or NvmlReader(fake_source=g.fake_source)
        self.watcher = XidEventWatcher(self.reader)
        self.our_pids: Callable[[], set[int]] = lambda: set()
        self.sampler = GpuSampler(AsyncNvmlReader(self.reader), interval_s=g.sample_interval,
                                  capacity=g.history_size, our_pids=lambda: self.our_pids(),
                                  on_sample=self._on_sample)
        self._verdict = Verdict(Level.OK, ("GPU not read yet",)) if not self.required else \
            Verdict(Level.UNHEALTHY, ("GPU not read yet",))
        self._detail: Any = None
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
        if changed:
            logger.info("GPU verdict: %s%s", verdict.level.value,
                        f" ({verdict.reason})" if verdict.reasons else "")
            if self.on_change:
                self.on_change()

    def verdict(self) -> Verdict:
        return self._verdict

    def verdict_summary(self) -> dict[str, Any]:
        return {"level": self._verdict.level.value, "reasons": list(self._verdict.reasons),
                "notes": list(self._detail.notes) if self._detail else []}

    def window(self, since: float, until: float | None = None):
        return self.sampler.window(since, until)

    def latest(self) -> GpuSnapshot | None:
        return self.sampler.latest()

    def update_metrics(self, metrics: Any) -> None:
        snapshot = self.sampler.latest()
        metrics.gpu_health.set({Level.OK: 0, Level.DEGRADED: 1,
                                Level.UNHEALTHY: 2}[self._verdict.level])
        if snapshot is None:
            return
        for gpu in snapshot.gpus:
            labels = (str(gpu.index), gpu.name or "unknown")
            _set(metrics.gpu_temp, labels, gpu.temperature and gpu.temperature.current_c)
            _set(metrics.gpu_power, labels, gpu.power and gpu.power.draw_w)
            _set(metrics.gpu_power_limit, labels, gpu.power and gpu.power.enforced_limit_w)
            _set(metrics.gpu_sm_clock, labels, gpu.clocks and gpu.clocks.sm_mhz)
            _set(metrics.gpu_util, labels, gpu.utilization and gpu.utilization.gpu_pct)
            used = gpu.memory and gpu.memory.used_mib
            _set(metrics.gpu_mem_used, labels, used * 1048576 if used is not None else None)
            reasons = {str(getattr(r, "value", r)) for r in
                       ((gpu.clocks and gpu.clocks.event_reasons) or ())}
            metrics.gpu_throttled.labels(*labels).set(1 if reasons & _THROTTLES else 0)

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
        }


def _set(gauge: Any, labels: tuple[str, str], value: float | None) -> None:
    if value is not None:
        gauge.labels(*labels).set(value)
