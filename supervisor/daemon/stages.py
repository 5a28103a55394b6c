"""The daemon's lifecycle as data: an ordered list of stages, started in order, stopped in reverse.

A stage is a name, a start coroutine, a stop coroutine and a named stop timeout. Only stages that
started are stopped (as aiohttp's cleanup contexts), so a start that fails half way undoes what it
did and nothing more. A stop that overruns its timeout is logged with what was still running and
the stop goes on with the next stage: one stuck part never keeps the others running.

The sum of the stop timeouts is the longest a clean stop can take (`stop_budget`); a test checks
that it fits inside the systemd unit's TimeoutStopSec.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

logger = logging.getLogger(__name__)

Step = Callable[[], Awaitable[None]]


async def _nothing() -> None:
    return None


def _pending_tasks() -> str:
    """The asyncio tasks still running besides the caller: what a stuck stop waits on."""
    current = asyncio.current_task()
    names = sorted(t.get_name() for t in asyncio.all_tasks() if t is not current and not t.done())
    return ", ".join(names) or "no other task"


@dataclass(frozen=True)
class Stage:
    """One part of the daemon's life. `timeout_name` says where the stop timeout comes from
    (a setting or a constant), so an overrun names what to change."""

    name: str
    start: Step = _nothing
    stop: Step = _nothing
    stop_timeout: float = 1.0
    timeout_name: str = ""
    #: What is still running when the stop overruns (default: the pending asyncio tasks).
    running: Callable[[], str] = _pending_tasks


class Stages:
    """Runs a list of stages: `start()` in order, `stop()` in reverse over those that started."""

    def __init__(self, stages: Sequence[Stage]):
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique: {names}")
        self.stages = tuple(stages)
        self._started: list[Stage] = []

    @property
    def started(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._started)

    async def start(self) -> None:
        """Start each stage in order; an exception stops there (and `stop()` undoes the rest)."""
        for stage in self.stages:
            # Counted as started before its start runs: a start that fails half way has set up
            # something (a task, a socket) that its stop must take down.
            self._started.append(stage)
            logger.debug("starting %s", stage.name)
            await stage.start()

    async def stop(self) -> None:
        """Stop the started stages in reverse order, each within its timeout."""
        while self._started:
            stage = self._started.pop()
            began = time.monotonic()
            task = asyncio.ensure_future(stage.stop())
            try:
                done, _ = await asyncio.wait({task}, timeout=stage.stop_timeout)
            except asyncio.CancelledError:
                task.cancel()
                raise
            if not done:
                what = stage.running()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                logger.warning("stopping %s took longer than %g s (%s); still running: %s; "
                               "going on", stage.name, stage.stop_timeout,
                               stage.timeout_name or "its stop timeout", what)
                continue
            exc = task.exception()
            if exc is not None:
                logger.error("stopping %s failed after %.1f s: %r; going on", stage.name,
                             time.monotonic() - began, exc, exc_info=exc)


def budget(stages: Sequence[Stage]) -> float:
    """The longest the stages' stop can take: the sum of their stop timeouts."""
    return sum(stage.stop_timeout for stage in stages)
