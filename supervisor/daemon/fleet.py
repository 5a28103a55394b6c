"""The instances of this host and the router in front of them.

The fleet plans one instance per chosen GPU (supervisor/instances/plan.py), gives each its
benchmark, and is the host its instances and their benchmarks talk to (`InstanceHost`,
`BenchmarkHost`): a ComfyUI lost fails the request it ran, a change is passed on to whoever
recomputes the worker's health, events go to a short log the snapshot shows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import aiohttp

from api.comfy.flags import ComfyFlags
from benchmark.telemetry import NullTelemetry, TelemetrySource
from config import Settings
from supervisor.checks.bench import BenchmarkSuite
from supervisor.children.child import ChildState
from supervisor.daemon.errors import DaemonStartError
from supervisor.daemon.health import WorkerFlags
from supervisor.gpu.model import GpuSnapshot
from supervisor.gpu.monitor import GpuMonitor
from supervisor.instances.instance import Instance
from supervisor.instances.plan import (
    InstancePlan,
    PlanError,
    plan_checked,
    select_gpus,
    uses_placeholders,
)
from supervisor.instances.probe import learn_flags
from supervisor.serving.estimate import Lane, estimated_wait
from supervisor.serving.routing import Router

logger = logging.getLogger(__name__)

#: Events kept in memory (the snapshot shows the last 30).
EVENTS_KEPT = 100


class Fleet:
    """The instances, their router and the events they raise."""

    def __init__(self, settings: Settings, flags: WorkerFlags, *,
                 session: Callable[[], aiohttp.ClientSession | None],
                 gpu: GpuMonitor | None = None, benchmark: BenchmarkSuite | None = None):
        self.settings = settings
        self.flags = flags
        self.gpu = gpu
        self.benchmark = benchmark
        self._session = session
        self.instances: list[Instance] = []
        self.router = Router(settings.worker.queue_size, restarting=self._restarting)
        self.events: list[dict[str, Any]] = []
        #: What ComfyUI's --help said it accepts, asked once before planning.
        self.comfy_flags: ComfyFlags | None = None
        #: Told when an instance changed (its children, its benchmark): recompute the health.
        self.on_change: Callable[[], None] = lambda: None
        #: Told when a benchmark finished: what the host can serve may have changed.
        self.on_capacity: Callable[[], None] = lambda: None
        self._tasks: list[asyncio.Task] = []

    # --- building -------------------------------------------------------------------------------
    def _common(self) -> dict[str, Any]:
        s = self.settings.supervisor
        return dict(probe_interval=s.probe_interval, probe_timeout=s.probe_timeout,
                    hang_timeout=s.hang_timeout, backoff_initial=s.backoff_initial,
                    backoff_max=s.backoff_max, crash_loop_count=s.crash_loop_count,
                    crash_loop_window=s.crash_loop_window, failed_cooldown=s.failed_cooldown,
                    stop_timeout=s.child_stop_timeout, log_max_bytes=s.log_max_bytes,
                    log_backups=s.log_backups)

    def _plan(self, latest: GpuSnapshot | None) -> list[InstancePlan]:
        """One instance per chosen GPU, from the first GPU read and ComfyUI's flags."""
        gpus = latest.gpus if latest is not None else ()
        templated = uses_placeholders(self.settings)
        usable = [g for g in gpus if g.available]
        if not templated and len(usable) > 1:
            logger.warning("comfyui.command has no placeholders, so one instance serves this "
                           "host's %d GPUs; write --port {port} and {instance_folders} in it to "
                           "run one per GPU (docs/multi-gpu.md)", len(usable))
        try:
            slots = select_gpus(self.settings.comfyui.gpus, gpus, templated=templated)
            return plan_checked(self.settings, slots, self.comfy_flags)
        except PlanError as exc:
            raise DaemonStartError(str(exc)) from None

    def build(self) -> None:
        latest = self.gpu.latest() if self.gpu else None
        for plan in self._plan(latest):
            instance = Instance(plan, self.settings, self, self._common(), self._session)
            if self.benchmark is not None:
                instance.benchmark = self.benchmark.for_instance(
                    plan.number, plan.state_dir, plan.gpu.name or "")
            self.instances.append(instance)
            self.router.add(instance)
            if plan.count > 1:
                logger.info("%s: ComfyUI %s, wrapper %s%s", instance.label, plan.comfyui_url,
                            plan.wrapper_url, f", CUDA_VISIBLE_DEVICES={plan.gpu.uuid}"
                            if plan.pinned else "")

    async def start(self) -> None:
        self.comfy_flags = await learn_flags(self.settings)
        self.build()
        for instance in self.instances:
            await instance.start()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # All at once: the stop budget counts one instance's children.
        await asyncio.gather(*(i.stop() for i in self.instances))

    # --- lookups --------------------------------------------------------------------------------
    @property
    def first(self) -> Instance | None:
        """The first instance (the only one on a one-GPU host)."""
        return self.instances[0] if self.instances else None

    def instance(self, number: int) -> Instance | None:
        return self.instances[number] if 0 <= number < len(self.instances) else None

    def pids(self) -> set[int]:
        return set().union(*(i.pids() for i in self.instances))

    def estimated_wait(self) -> float | None:
        """Seconds a request arriving now would wait (None before a benchmark figure)."""
        lanes = []
        for instance in self.instances:
            perf = instance.benchmark.max_perf() if instance.benchmark else None
            if instance.accepting and perf:
                lanes.append(Lane(1.0 / perf, self.router.handed(instance.number)))
        return estimated_wait(lanes, self.router.waiting, time.monotonic())

    # --- what an instance asks of its host (InstanceHost) ---------------------------------------
    @property
    def stopping(self) -> bool:
        return self.flags.stopping

    def comfyui_lost(self, instance: Instance, reason: str) -> None:
        if self.router.running_on(instance.number):
            what = "ComfyUI" if len(self.instances) == 1 else f"ComfyUI of {instance.label}"
            # Finished ones are dropped: the list stays as long as what runs, over months.
            self._tasks = [t for t in self._tasks if not t.done()]
            self._tasks.append(asyncio.get_running_loop().create_task(
                self._abort_running(instance, f"{what} died during the request: {reason}"),
                name="abort-running"))

    def instance_changed(self, instance: Instance) -> None:
        self.on_change()

    def event(self, source: str, text: str) -> None:
        self.events.append({"at": time.time(), "source": source, "event": text})
        del self.events[:-EVENTS_KEPT]

    # --- what a benchmark asks of its host (BenchmarkHost) --------------------------------------
    def telemetry(self, gpu_index: int | None) -> TelemetrySource:
        return self.gpu.telemetry(gpu_index) if self.gpu else NullTelemetry()

    def benchmark_finished(self, instance: Instance) -> None:
        self.on_change()   # a sibling's verdict may have changed too
        self.on_capacity()

    # --- requests -------------------------------------------------------------------------------
    def _restarting(self) -> bool:
        """A child is on its way back (not failed, not stopping): worth waiting for."""
        coming_back = (ChildState.RESTARTING, ChildState.STARTING)
        return not (self.flags.stopping or self.flags.draining) and any(
            i.comfyui.state in coming_back or i.wrapper.state in coming_back
            for i in self.instances if not i.draining)

    async def _abort_running(self, instance: Instance, message: str) -> None:
        """Answer the request ComfyUI was running with a 502 now; the ones queued behind it stay
        with the wrapper, which runs them on the new ComfyUI (or, on a multi-GPU host, move to
        another instance). The wrapper is asked which one runs (this project's says so in
        /health); for another wrapper, the oldest is taken."""
        running: str | None = None
        known = False
        session = self._session()
        assert session is not None
        try:
            async with session.get(f"{instance.wrapper_url}/health",
                                   timeout=aiohttp.ClientTimeout(total=0.5)) as response:
                detail = await response.json(content_type=None)
            if isinstance(detail, dict) and "running" in detail:
                running, known = detail["running"], True
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            pass
        if self.router.abort_running(instance, message, running, known):
            logger.warning("request in flight failed: %s", message)
