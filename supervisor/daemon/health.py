"""The worker's health, recomputed in one place: telemetry → policy → state → gate.

Each instance is judged on its own (`Instance.derive`, by `supervisor.state.derive`) from its
children, its GPU's verdict, the models and its benchmark; the worker's state combines theirs
(`supervisor.state.combine`). The router is told after every recompute (an instance may have
started or stopped taking work); the listeners of the worker's tracker (systemd, metrics, the
autoscaler) hear of every change of state or reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from supervisor.children.child import ChildState
from supervisor.instances.instance import Instance
from supervisor.sdnotify import SystemdNotifier
from supervisor.state import (
    OK,
    Level,
    Readiness,
    Verdict,
    WorkerState,
    WorkerStateTracker,
    combine,
)

logger = logging.getLogger(__name__)


@dataclass
class WorkerFlags:
    """What the operator or the signals asked of the whole worker."""

    draining: bool = False   # `comfy-worker drain` for all instances: no new work
    stopping: bool = False   # SIGTERM/SIGINT: the worker is on its way down


class GpuVerdicts(Protocol):
    """The GPU policy's verdict (supervisor.gpu.monitor.GpuMonitor)."""

    def verdict(self, index: int | None = None) -> Verdict: ...

    def critical(self, index: int | None = None) -> tuple[str, ...]: ...


class DiskVerdicts(Protocol):
    """The disk guard's verdict for an instance (supervisor.checks.disk.DiskGuard)."""

    def verdict(self, instance: int | None = None) -> Verdict: ...


class ModelsCheck(Protocol):
    """The model manifest's state (supervisor.checks.provisioning.Provisioner)."""

    @property
    def ready(self) -> bool: ...

    def verdict(self) -> Verdict: ...

    def reason(self) -> str: ...


class WorkerHealth:
    """Derives each instance's state and the worker's; tells the router and the listeners."""

    def __init__(self, instances: Sequence[Instance], flags: WorkerFlags, *,
                 gpu: GpuVerdicts | None = None, models: ModelsCheck | None = None,
                 disk: DiskVerdicts | None = None, started_at: float | None = None):
        self.instances = instances
        self.flags = flags
        self.gpu = gpu
        self.models = models
        self.disk = disk
        self.started_at = time.time() if started_at is None else started_at
        self.tracker = WorkerStateTracker()
        #: Called on every recompute, changed or not, before the tracker is told (the router
        #: hands out room there).
        self.on_recompute: list[Callable[[], None]] = []

    @property
    def state(self) -> WorkerState:
        return self.tracker.state

    @property
    def models_ready(self) -> bool:
        """Every before_ready model of the manifest is in place (true without a manifest)."""
        return self.models is None or self.models.ready

    def recompute(self) -> None:
        if not self.instances:
            return
        models = self.models.verdict() if self.models else OK
        provisioning = self.models.reason() if self.models else ""
        for instance in self.instances:
            gpu = OK
            if self.gpu:
                gpu = self.gpu.verdict(instance.plan.gpu.index if instance.plan.pinned else None)
            disk = self.disk.verdict(instance.number) if self.disk else OK
            instance.derive(gpu=gpu, models=models, provisioning=provisioning,
                            draining=self.flags.draining, stopping=self.flags.stopping, disk=disk)
        state, reason = combine([(i.label, i.state, i.reason) for i in self.instances])
        for listener in self.on_recompute:
            listener()
        self.tracker.update(state, reason)

    def max_perf(self) -> float | None:
        """Requests per second the host can serve: the sum over the instances that serve."""
        figures = [i.benchmark.max_perf() for i in self.instances
                   if i.benchmark is not None and i.state.serving]
        known = [f for f in figures if f is not None]
        return sum(known) if known else None

    def _fatal(self, instance: Instance) -> str:
        """Why this instance will not serve again by itself ('' when it may)."""
        for name, child in (("ComfyUI", instance.comfyui), ("the wrapper", instance.wrapper)):
            if child.state is ChildState.FAILED:   # a crash loop that gave up
                return f"{name} failed: {child.reason}"
        if self.gpu is not None:
            critical = self.gpu.critical(instance.plan.gpu.index if instance.plan.pinned
                                         else None)
            if critical:
                return "; ".join(critical)
        bench = instance.benchmark
        if bench is not None and not bench.running and \
                bench.verdict().level is Level.UNHEALTHY:   # slow (refused), or could not run
            return bench.verdict().reason
        return ""

    def fatal(self) -> str:
        """Why the worker will not serve again by itself: every instance has such a reason."""
        reasons = [(i, self._fatal(i)) for i in self.instances]
        if not reasons or not all(why for _, why in reasons):
            return ""
        if len(reasons) == 1:
            return reasons[0][1]
        return "; ".join(f"{i.label}: {why}" for i, why in reasons)

    def readiness(self) -> Readiness:
        tracker = self.tracker
        return Readiness(tracker.state, tracker.reason, self.max_perf(), self.started_at,
                         self.fatal())


class SystemdStatus:
    """A tracker listener: STATUS= on every change, READY=1 the first time the worker serves."""

    def __init__(self, notifier: SystemdNotifier):
        self.notifier = notifier
        self._announced_ready = False

    def __call__(self, old: WorkerState, new: WorkerState, reason: str) -> None:
        self.notifier.status(f"{new.value}: {reason}")
        if new.serving and not self._announced_ready:
            self._announced_ready = True
            self.notifier.ready(f"{new.value}: {reason}")
