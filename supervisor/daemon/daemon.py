"""`comfy-worker run`: the daemon that a systemd unit starts on a GPU host.

The daemon composes named parts and runs them as stages (supervisor/daemon/stages.py), started
in this order and stopped in reverse:

  systemd → session → provisioning → gpu → autoscaler → tls → instances → disk → admin →
  metrics → public → watch → requests → drain

* the fleet (`fleet.py`): one ComfyUI and one API wrapper per GPU (`supervisor.instances`) and
  the router in front of them;
* the health (`health.py`): each instance's state and the worker's, told to systemd, the
  metrics, the router and the autoscaler;
* the disk guard (`supervisor/checks/disk.py`): free space where the instances write, sampled
  with the GPU; a warning asks the wrappers' retention for space, critical takes work away;
* the watch loop (`watch.py`): once a second it recomputes the health, pets the systemd
  watchdog, checks that running prompts progress and starts a due benchmark;
* the snapshot (`snapshot.py`) the admin socket serves, and /health's projection of it;
* the admin actions (`admin_actions.py`) and the three listeners (`listeners.py`).

Stopping is the reverse: the drain lets queued work finish (worker.drain_timeout; a second
SIGTERM/SIGINT skips it), what is left is failed, then each part stops within its own timeout.
Signal handlers only set flags; the main coroutine does the work. The autoscaler's
POST /pyworker/update stops it the same way, and `run()` then returns `Ending.RESTART_REQUESTED`,
which the `run` command turns into an exit status the service manager restarts (75).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import time
from pathlib import Path

import aiohttp

from config import Settings
from supervisor.checks.bench import BenchmarkSuite
from supervisor.checks.disk import DiskGuard, DiskThresholds, WrapperRetention, watched_folders
from supervisor.checks.provisioning import Provisioner
from supervisor.children.child import ChildSpec
from supervisor.daemon.admin_actions import AdminActions
from supervisor.daemon.errors import DaemonStartError
from supervisor.daemon.fleet import Fleet
from supervisor.daemon.health import SystemdStatus, WorkerFlags, WorkerHealth
from supervisor.daemon.listeners import AdminPort, MetricsPort, PublicPort
from supervisor.daemon.metric_sources import register_metric_sources
from supervisor.daemon.parts import Autoscaler
from supervisor.daemon.snapshot import Snapshots
from supervisor.daemon.stages import Stage, Stages
from supervisor.daemon.watch import WatchLoop
from supervisor.gpu.monitor import GpuMonitor
from supervisor.reporting.metrics import WorkerMetrics
from supervisor.sdnotify import SystemdNotifier
from supervisor.serving.gates import Gate, OpenGate, TokenGate
from supervisor.serving.public import RequestHooks, WaitLimit

__all__ = ["Daemon", "DaemonStartError", "Ending", "stop_budget", "stop_timeouts"]

logger = logging.getLogger(__name__)


class Ending(enum.Enum):
    """Why `Daemon.run()` returned; the `run` command maps it to the process's exit status."""

    STOPPED = "stopped"                        # SIGTERM or SIGINT: stay stopped
    RESTART_REQUESTED = "restart requested"    # POST /pyworker/update: start again, updated


#: Stop timeouts of the stages that have no setting of their own, in seconds.
ADMIN_CLOSE_TIMEOUT = 2.0
PUBLIC_CLOSE_TIMEOUT = 2.0
METRICS_CLOSE_TIMEOUT = 1.0
REPORTER_FLUSH_TIMEOUT = 3.0
GPU_STOP_TIMEOUT = 2.0      # the XID watcher's thread leaves NVML's event wait (1 s)
QUICK_STOP_TIMEOUT = 0.5    # cancelling tasks, closing a session, a last log line
NOTHING_TO_STOP = 0.1       # a stage whose stop does nothing that waits


def stop_timeouts(settings: Settings) -> dict[str, tuple[float, str]]:
    """Each stage's stop timeout (seconds) and where it comes from, in stop order."""
    child = ChildSpec(name="budget", command=["true"],
                      stop_timeout=settings.supervisor.child_stop_timeout).stop_budget()
    return {
        "drain": (settings.worker.drain_timeout, "worker.drain_timeout"),
        "requests": (NOTHING_TO_STOP, "NOTHING_TO_STOP"),
        "watch": (QUICK_STOP_TIMEOUT, "QUICK_STOP_TIMEOUT"),
        "public": (PUBLIC_CLOSE_TIMEOUT, "PUBLIC_CLOSE_TIMEOUT"),
        "metrics": (METRICS_CLOSE_TIMEOUT, "METRICS_CLOSE_TIMEOUT"),
        "admin": (ADMIN_CLOSE_TIMEOUT, "ADMIN_CLOSE_TIMEOUT"),
        "disk": (QUICK_STOP_TIMEOUT, "QUICK_STOP_TIMEOUT"),
        # Each instance stops its wrapper, then its ComfyUI; the instances stop at once.
        "instances": (2 * child, "2 × supervisor.child_stop_timeout + kill and reap"),
        "tls": (NOTHING_TO_STOP, "NOTHING_TO_STOP"),
        "autoscaler": (REPORTER_FLUSH_TIMEOUT + QUICK_STOP_TIMEOUT, "REPORTER_FLUSH_TIMEOUT"),
        "gpu": (GPU_STOP_TIMEOUT, "GPU_STOP_TIMEOUT"),
        "provisioning": (QUICK_STOP_TIMEOUT, "QUICK_STOP_TIMEOUT"),
        "session": (QUICK_STOP_TIMEOUT, "QUICK_STOP_TIMEOUT"),
        "systemd": (QUICK_STOP_TIMEOUT, "QUICK_STOP_TIMEOUT"),
    }


def stop_budget(settings: Settings) -> float:
    """The longest a clean stop can take: every stage's stop timeout, added up."""
    return sum(seconds for seconds, _ in stop_timeouts(settings).values())


class Daemon:
    def __init__(self, settings: Settings, *, environ: dict[str, str] | None = None,
                 gpu_monitor: GpuMonitor | None = None, benchmark: BenchmarkSuite | None = None,
                 autoscaler: Autoscaler | None = None, provisioner: Provisioner | None = None):
        self.settings = settings
        self.started_at = time.time()
        self.flags = WorkerFlags()
        self.metrics = WorkerMetrics()
        self.notifier = SystemdNotifier(dict(os.environ if environ is None else environ))
        self.gpu, self.autoscaler, self.provisioner = gpu_monitor, autoscaler, provisioner
        self.session: aiohttp.ClientSession | None = None
        self._provisioning: asyncio.Task | None = None
        self.fleet = Fleet(settings, self.flags, session=lambda: self.session, gpu=gpu_monitor,
                           benchmark=benchmark)
        # Sampled with the GPU; what it watches is known once the instances are planned.
        self.disk = DiskGuard((), DiskThresholds.from_settings(settings),
                              interval=settings.gpu.sample_interval)
        self.health = WorkerHealth(self.fleet.instances, self.flags, gpu=gpu_monitor,
                                   models=provisioner, disk=self.disk,
                                   started_at=self.started_at)
        self.watch = WatchLoop(self.health, self.fleet, self.notifier)
        self.gate = self._gate()
        self.snapshots = Snapshots(health=self.health, flags=self.flags, fleet=self.fleet,
                                   metrics=self.metrics, max_waiting=settings.worker.queue_size,
                                   auth=self.gate.name, gpu=gpu_monitor, provisioner=provisioner,
                                   disk=self.disk, started_at=self.started_at)
        self._listen()
        register_metric_sources(self.metrics, self.fleet, queue_size=settings.worker.queue_size,
                                gpu=gpu_monitor, provisioner=provisioner, disk=self.disk)
        self.stages = Stages(self._stages())
        self._stop_requests = 0
        self._ending = Ending.STOPPED
        self._stop_event = asyncio.Event()
        self._stop_now = asyncio.Event()   # a second SIGTERM/SIGINT: skip the drain

    def _gate(self) -> Gate:
        if self.autoscaler:
            return self.autoscaler.gate()
        if self.settings.worker.auth_token:
            return TokenGate(self.settings.worker.auth_token)
        logger.warning("UNSECURED=true: the public port accepts work from anyone who reaches it")
        return OpenGate()

    def _listen(self) -> None:
        """Who hears of what: the router after every recompute, the rest on each change."""
        self.fleet.on_change = self.health.recompute
        self.fleet.on_capacity = self._capacity_changed
        self.disk.on_change = self.health.recompute
        self.health.on_recompute.append(self.fleet.router.changed)
        tracker = self.health.tracker
        tracker.add_listener(lambda old, new, reason: self.metrics.set_state(new))
        tracker.add_listener(SystemdStatus(self.notifier))
        if self.autoscaler:
            autoscaler = self.autoscaler
            tracker.add_listener(lambda old, new, reason: autoscaler.state_changed())
            autoscaler.on_update = self._update_requested
            fleet = self.fleet
            autoscaler.model_server = lambda: fleet.first.wrapper_url if fleet.first else None

    def _capacity_changed(self) -> None:
        self.health.recompute()
        if self.autoscaler:
            self.autoscaler.state_changed()

    # --- stages ---------------------------------------------------------------------------------
    def _stages(self) -> list[Stage]:
        s, fleet = self.settings, self.fleet
        timeouts = stop_timeouts(s)
        autoscaler = self.autoscaler
        actions = AdminActions(fleet, self.health, self.flags)
        admin = AdminPort(Path(s.worker.admin_socket), snapshot=self.snapshots.build,
                          actions=actions.table())
        metrics = MetricsPort(s, self.metrics, fleet, close_timeout=METRICS_CLOSE_TIMEOUT)
        public = PublicPort(
            s, tracker=self.health.tracker, gate=self.gate, fleet=fleet, metrics=self.metrics,
            hooks=autoscaler.hooks() if autoscaler else RequestHooks(),
            snapshot=self.snapshots.public, liveness=self.watch.liveness,
            required_auth_fields=autoscaler.required_auth_fields if autoscaler else None,
            close_timeout=PUBLIC_CLOSE_TIMEOUT,
            # The SDK's estimated-wait refusal, behind the autoscaler only.
            wait_limit=WaitLimit(s.autoscaler.max_queue_time, fleet.estimated_wait)
            if autoscaler else None,
            routes=autoscaler.routes() if autoscaler else None)
        stages = [
            Stage("systemd", self._announce_start, self._announce_stopped),
            Stage("session", self._open_session, self._close_session),
            Stage("provisioning", self._start_provisioning, self._stop_provisioning)
            if self.provisioner else None,
            Stage("gpu", self._start_gpu, self.gpu.stop) if self.gpu else None,
            Stage("autoscaler", lambda: autoscaler.start(self.health.readiness,
                                                         self.disk.used_gib),
                  autoscaler.stop) if autoscaler else None,
            Stage("tls", public.load_tls),
            Stage("instances", fleet.start, fleet.stop),
            Stage("disk", self._start_disk_guard, self.disk.stop),
            Stage("admin", admin.start, admin.stop),
            Stage("metrics", metrics.start, metrics.stop) if s.metrics.port else None,
            Stage("public", public.start, public.stop),
            Stage("watch", self.watch.start, self.watch.stop, running=self.watch.running),
            Stage("requests", stop=self._fail_what_is_left),
            Stage("drain", stop=self._drain, running=self._in_flight),
        ]
        return [Stage(st.name, st.start, st.stop, *timeouts[st.name], running=st.running)
                for st in stages if st is not None]

    async def _announce_start(self) -> None:
        s = self.settings
        self.metrics.set_state(self.health.state)
        self.notifier.status("starting: launching ComfyUI and the wrapper")
        Path(s.worker.log_dir).mkdir(parents=True, exist_ok=True)
        Path(s.worker.state_dir).mkdir(parents=True, exist_ok=True)

    async def _announce_stopped(self) -> None:
        logger.info("stopped")
        self.notifier.close()

    async def _open_session(self) -> None:
        self.session = aiohttp.ClientSession()

    async def _close_session(self) -> None:
        if self.session:
            await self.session.close()

    async def _start_provisioning(self) -> None:
        assert self.provisioner is not None
        # Downloads start at once, while ComfyUI starts: they are usually the long part.
        self.provisioner.on_change = self.health.recompute
        self._provisioning = asyncio.create_task(self.provisioner.run(), name="provisioning")

    async def _stop_provisioning(self) -> None:
        assert self.provisioner is not None and self._provisioning is not None
        self._provisioning.cancel()
        await asyncio.gather(self._provisioning, return_exceptions=True)
        await self.provisioner.close()

    async def _start_disk_guard(self) -> None:
        """Watch the folders of the instances (their plans' folders until the running ComfyUI
        shows its own); their wrappers' retention frees space."""
        instances = self.fleet.instances
        self.disk.watch(lambda: watched_folders([i.plan for i in instances], self.settings),
                        WrapperRetention({i.number: i.wrapper_url for i in instances},
                                         lambda: self.session))
        await self.disk.start()

    async def _start_gpu(self) -> None:
        assert self.gpu is not None
        self.gpu.our_pids = self.fleet.pids
        self.gpu.on_change = self.health.recompute
        await self.gpu.start()

    async def _drain(self) -> None:
        """The worker stops: no new work; what is queued may finish (unless asked twice)."""
        self.flags.stopping = True
        self.health.recompute()
        self.notifier.stopping("stopping: draining, then stopping the children")
        if self._stop_requests > 1:
            return
        router = self.fleet.router

        async def idle() -> None:
            while router.busy:
                await asyncio.sleep(0.1)

        waiter = asyncio.create_task(idle())
        second = asyncio.create_task(self._stop_now.wait())
        try:
            await asyncio.wait({waiter, second}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            second.cancel()

    def _in_flight(self) -> str:
        router = self.fleet.router
        return f"{router.in_flight} request(s) in flight, {router.waiting} waiting"

    async def _fail_what_is_left(self) -> None:
        self.fleet.router.abort_all("the worker is stopping; the request did not finish within "
                                    "the drain time")

    # --- run ------------------------------------------------------------------------------------
    def request_stop(self, signame: str) -> None:
        self._stop_requests += 1
        if self._stop_requests == 1:
            logger.info("%s received: stopping (drain up to %g s)", signame,
                        self.settings.worker.drain_timeout)
        else:
            logger.warning("%s received again: stopping now", signame)
            self._stop_now.set()
        self._stop_event.set()

    def _update_requested(self) -> None:
        self._ending = Ending.RESTART_REQUESTED
        self.request_stop("POST /pyworker/update")

    async def run(self) -> Ending:
        """Run until stopped; why it stopped (RESTART_REQUESTED after an update request)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        try:
            try:
                await self.stages.start()
            except DaemonStartError as exc:
                if self.autoscaler:
                    self.autoscaler.start_failed(str(exc))
                raise
            await self._stop_event.wait()
        finally:
            await self.stages.stop()
        return self._ending
