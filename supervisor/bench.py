"""The daemon's side of the start-up benchmark: when to run it, and what its verdict means.

The benchmark runs once both children are ready and before the worker first takes work (the
worker state is `benchmarking` meanwhile). Its report becomes a `Verdict`: a slow node is
unhealthy under `benchmark.action = refuse` and degraded under `report`; a benchmark that could
not run (a missing checkpoint, a wrong image) is unhealthy with its reason, and is not retried in
a loop — only `comfy-worker benchmark` or a restart runs it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from benchmark import (
    BenchmarkAction,
    BenchmarkProgress,
    BenchmarkReport,
    BenchmarkStatus,
    BenchmarkStore,
    NullTelemetry,
    SamplerTelemetry,
    WrapperTarget,
    cached_benchmark,
    render_progress,
)
from config import Settings
from supervisor.child import ChildState
from supervisor.state import OK, Level, Verdict

logger = logging.getLogger(__name__)


class BenchmarkController:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = BenchmarkStore.for_state_dir(settings.worker.state_dir)
        self.report: BenchmarkReport | None = None
        self.started = False       # the first run has begun
        self.running = False
        self.pending = True        # no verdict yet: the worker waits for one
        self.progress: BenchmarkProgress | None = None
        self._force = False
        self._finished_at: float | None = None

    # --- what the daemon asks -------------------------------------------------------------------
    def should_start(self, daemon: Any) -> bool:
        return (self.pending and not self.running and daemon.models_ready
                and daemon.comfyui.state is ChildState.READY
                and daemon.wrapper.state is ChildState.READY)

    def verdict(self) -> Verdict:
        report = self.report
        if report is None:
            return OK
        if report.status is BenchmarkStatus.ERROR:
            return Verdict(Level.UNHEALTHY, (report.reason(),))
        if report.status is BenchmarkStatus.SLOW:
            level = Level.UNHEALTHY if report.action is BenchmarkAction.REFUSE else Level.DEGRADED
            return Verdict(level, (report.reason(),))
        if report.drift is not None and report.drift.flagged:
            return Verdict(Level.DEGRADED, (f"benchmark drift: {report.drift.text}",))
        return OK

    def max_perf(self) -> float | None:
        return self.report.max_perf if self.report and self.report.ok else None

    def snapshot(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": "pending" if self.pending else "done",
                                "running": self.running}
        if self.progress is not None and self.running:
            body["progress"] = {"phase": self.progress.phase.value, "run": self.progress.run,
                                "runs": self.progress.runs, "step": self.progress.step,
                                "steps": self.progress.steps, "its": self.progress.its,
                                "text": render_progress(self.progress)}
        if self.report is not None:
            body.update(self.report.to_dict())
            body["status"] = self.report.status.value
            body["reason"] = self.report.reason()
            body["finished_at"] = self._finished_at
        return body

    # --- running --------------------------------------------------------------------------------
    async def run(self, daemon: Any) -> None:
        self.started = self.running = True
        self.progress = None
        daemon._recompute()
        s = self.settings
        target = WrapperTarget(s.wrapper.url, s.comfyui.url, s.comfyui_output_dir)
        telemetry = SamplerTelemetry(daemon.gpu.sampler) if daemon.gpu and \
            daemon.gpu.reader.status().state.value == "available" else NullTelemetry()

        def on_progress(progress: BenchmarkProgress) -> None:
            self.progress = progress

        started = time.monotonic()
        try:
            report = await cached_benchmark(target, s, telemetry, store=self.store,
                                            force=self._force, on_progress=on_progress)
        except asyncio.CancelledError:
            self.running = False
            raise
        except Exception:  # the library reports node problems itself; this is a bug
            logger.exception("benchmark crashed")
            self.running = False
            daemon._recompute()
            return
        self._force = False
        self.report = report
        self._finished_at = time.time()
        self.running = False
        self.pending = False
        level = logging.INFO if report.ok else logging.WARNING
        logger.log(level, "%s (%.1f s%s)", report.reason(), time.monotonic() - started,
                   ", from cache" if report.from_cache else "")
        daemon._event("benchmark", report.reason())
        daemon._recompute()
        if daemon.autoscaler:
            daemon.autoscaler.state_changed(daemon)

    async def request_rerun(self, daemon: Any) -> dict[str, Any]:
        if self.running:
            return {"ok": False, "message": "the benchmark is already running"}
        self._force = True
        self.pending = True
        daemon._recompute()
        return {"ok": True, "message": "the benchmark will run as soon as both children are ready"}
