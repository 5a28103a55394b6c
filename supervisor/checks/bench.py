"""The daemon's side of the start-up benchmark: when to run it, and what its verdict means.

The benchmark runs once both children are ready and before the worker first takes work (the
worker state is `benchmarking` meanwhile). Its report becomes a `Verdict`: a slow node is
unhealthy under `benchmark.action = refuse` and degraded under `report`; a benchmark that could
not run (a missing checkpoint, a wrong image) is unhealthy with its reason, and is not retried in
a loop — only `comfy-worker benchmark` or a restart runs it again.

Each instance of a multi-GPU host has its own controller; the `BenchmarkSuite` makes them (all
at once by default, one at a time with `benchmark.sequential`) and, when one finishes, compares
GPUs of the same model with each other (`benchmark.siblings`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from benchmark import (
    BenchmarkAction,
    BenchmarkProgress,
    BenchmarkReport,
    BenchmarkStatus,
    BenchmarkStore,
    WrapperTarget,
    cached_benchmark,
    render_progress,
)
from benchmark.siblings import SiblingFigure, SiblingJudgement, judge_siblings
from benchmark.telemetry import TelemetrySource
from config import Settings
from supervisor.children.child import ChildState
from supervisor.instances.instance import Instance
from supervisor.state import OK, Level, Verdict

logger = logging.getLogger(__name__)


class BenchmarkHost(Protocol):
    """What a benchmark run asks of the host that starts it."""

    def telemetry(self, gpu_index: int | None) -> TelemetrySource: ...

    def instance_changed(self, instance: Instance) -> None: ...

    def benchmark_finished(self, instance: Instance) -> None: ...

    def event(self, source: str, text: str) -> None: ...


class BenchmarkController:
    """One instance's benchmark: when it runs, its report, and the verdict it gives."""

    def __init__(self, settings: Settings, *, state_dir: Path | str | None = None,
                 lock: asyncio.Lock | None = None, on_done: Callable[[], None] | None = None):
        self.settings = settings
        self.store = BenchmarkStore.for_state_dir(state_dir or settings.worker.state_dir)
        self.report: BenchmarkReport | None = None
        self.siblings: SiblingJudgement | None = None
        self.started = False       # the first run has begun
        self.running = False
        self.pending = True        # no verdict yet: the instance waits for one
        self.progress: BenchmarkProgress | None = None
        self._force = False
        self._finished_at: float | None = None
        self._lock = lock
        self._on_done = on_done

    # --- what the daemon asks -------------------------------------------------------------------
    def should_start(self, instance: Instance, models_ready: bool) -> bool:
        return (self.pending and not self.running and models_ready
                and instance.comfyui.state is ChildState.READY
                and instance.wrapper.state is ChildState.READY)

    @property
    def sibling_slow(self) -> bool:
        return bool(self.siblings and self.siblings.slow and self.report is not None
                    and self.report.status is not BenchmarkStatus.ERROR)

    def reason(self) -> str:
        report = self.report
        if report is None:
            return ""
        if self.sibling_slow and report.status is not BenchmarkStatus.SLOW:
            assert self.siblings is not None
            cached = " (cached)" if report.from_cache else ""
            return (f"benchmark{cached}: {self.siblings.text()}: "
                    + ("; ".join(report.causes) if report.causes
                       else "no cause found in telemetry"))
        return report.reason()

    def verdict(self) -> Verdict:
        report = self.report
        if report is None:
            return OK
        if report.status is BenchmarkStatus.ERROR:
            return Verdict(Level.UNHEALTHY, (self.reason(),))
        if report.status is BenchmarkStatus.SLOW or self.sibling_slow:
            level = Level.UNHEALTHY if report.action is BenchmarkAction.REFUSE else Level.DEGRADED
            return Verdict(level, (self.reason(),))
        if report.drift is not None and report.drift.flagged:
            return Verdict(Level.DEGRADED, (f"benchmark drift: {report.drift.text}",))
        return OK

    def max_perf(self) -> float | None:
        return self.report.max_perf if self.report and self.report.ok and \
            not self.sibling_slow else None

    def status(self) -> str:
        if self.report is None:
            return "pending"
        return "slow" if self.sibling_slow else self.report.status.value

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
            body["status"] = self.status()
            body["reason"] = self.reason()
            body["finished_at"] = self._finished_at
        if self.siblings is not None:
            body["siblings"] = self.siblings.to_dict()
        return body

    # --- running --------------------------------------------------------------------------------
    async def run(self, instance: Instance, host: BenchmarkHost) -> None:
        self.started = self.running = True
        self.progress = None
        host.instance_changed(instance)
        await instance.folders_settled()
        s, plan = self.settings, instance.plan
        target = WrapperTarget(plan.wrapper_url, plan.comfyui_url, plan.folders.output.path)
        telemetry = host.telemetry(plan.gpu.index)

        def on_progress(progress: BenchmarkProgress) -> None:
            self.progress = progress

        started = time.monotonic()
        try:
            if self._lock is not None:
                async with self._lock:
                    report = await cached_benchmark(target, s, telemetry, store=self.store,
                                                    force=self._force, on_progress=on_progress)
            else:
                report = await cached_benchmark(target, s, telemetry, store=self.store,
                                                force=self._force, on_progress=on_progress)
        except asyncio.CancelledError:
            self.running = False
            raise
        except Exception:  # the library reports node problems itself; this is a bug
            logger.exception("benchmark crashed")
            self.running = False
            host.instance_changed(instance)
            return
        self._force = False
        self.report = report
        self._finished_at = time.time()
        self.running = False
        self.pending = False
        level = logging.INFO if report.ok else logging.WARNING
        logger.log(level, "%s%s (%.1f s%s)",
                   f"{instance.label}: " if plan.count > 1 else "", report.reason(),
                   time.monotonic() - started, ", from cache" if report.from_cache else "")
        host.event("benchmark" + plan.suffix, report.reason())
        if self._on_done is not None:
            self._on_done()
        host.instance_changed(instance)
        host.benchmark_finished(instance)

    def rerun(self) -> dict[str, Any]:
        if self.running:
            return {"ok": False, "message": "the benchmark is already running"}
        self._force = True
        self.pending = True
        return {"ok": True, "message": "the benchmark will run as soon as both children are ready"}


class BenchmarkSuite:
    """The benchmarks of all instances: made here, run at once (or in turn), and compared."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.controllers: dict[int, BenchmarkController] = {}
        self.models: dict[int, str] = {}
        self._lock = asyncio.Lock() if settings.benchmark.sequential else None

    def for_instance(self, number: int, state_dir: Path, gpu_model: str) -> BenchmarkController:
        controller = BenchmarkController(self.settings, state_dir=state_dir, lock=self._lock,
                                         on_done=self.compare_siblings)
        self.controllers[number] = controller
        self.models[number] = gpu_model
        return controller

    def compare_siblings(self) -> None:
        """Set each controller's sibling judgement from the reports there are now."""
        figures = [SiblingFigure(number, self.models[number], c.report.its)
                   for number, c in self.controllers.items()
                   if c.report is not None and c.report.its and self.models[number]
                   and c.report.status is not BenchmarkStatus.ERROR]
        judged = judge_siblings(figures, self.settings.benchmark.slow_threshold)
        for number, controller in self.controllers.items():
            before = controller.sibling_slow
            controller.siblings = judged.get(number)
            if controller.sibling_slow and not before:
                logger.warning("instance %d: benchmark %s", number, controller.reason())
