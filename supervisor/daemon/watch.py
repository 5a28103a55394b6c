"""The watch loop: the daemon's heartbeat, once a second.

Each tick recomputes the worker's health (so a hold in the router runs out on time), has each
instance check that its running prompt is making progress, pets the systemd watchdog (a stuck loop
is caught by systemd) and starts a benchmark that is due. `liveness()` says how long ago it last
ticked: /health/live answers from it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from supervisor.daemon.fleet import Fleet
from supervisor.daemon.health import WorkerHealth
from supervisor.sdnotify import SystemdNotifier

logger = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0


class WatchLoop:
    def __init__(self, health: WorkerHealth, fleet: Fleet, notifier: SystemdNotifier, *,
                 interval: float = WATCH_INTERVAL):
        self.health = health
        self.fleet = fleet
        self.notifier = notifier
        self.interval = interval
        self._last_tick = time.monotonic()
        self._task: asyncio.Task | None = None
        self._benchmarks: list[asyncio.Task] = []

    def liveness(self) -> tuple[bool, str]:
        age = time.monotonic() - self._last_tick
        if age > 10 * self.interval + 5:
            return False, f"the watch loop has not ticked for {age:.0f} s"
        return True, f"the watch loop ticked {age:.1f} s ago"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="watch")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._benchmarks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def running(self) -> str:
        """What is still running, for a stop that overruns."""
        names = [t.get_name() for t in (self._task, *self._benchmarks)
                 if t is not None and not t.done()]
        return ", ".join(names) or "nothing"

    def tick(self, watchdog: bool) -> None:
        self._last_tick = time.monotonic()
        self.health.recompute()
        for instance in self.fleet.instances:
            instance.check_stall()
        if watchdog:
            self.notifier.watchdog()
        self._start_benchmarks()

    def _start_benchmarks(self) -> None:
        suite = self.fleet.benchmark
        if suite is None:
            return
        for number, controller in suite.controllers.items():
            instance = self.fleet.instance(number)
            if instance is not None and controller.should_start(instance,
                                                                 self.health.models_ready):
                self._benchmarks = [t for t in self._benchmarks if not t.done()]
                self._benchmarks.append(asyncio.create_task(
                    controller.run(instance, self.fleet),
                    name=f"benchmark{instance.plan.suffix}"))

    async def _run(self) -> None:
        watchdog = self.notifier.watchdog_interval() is not None
        while not self.health.flags.stopping:
            self.tick(watchdog)
            await asyncio.sleep(self.interval)

