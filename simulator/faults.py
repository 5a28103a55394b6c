"""The crash and hang knobs, fired part-way through a prompt."""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Protocol

from simulator.knobs import HangMode
from simulator.nodes import NodeEnv

logger = logging.getLogger(__name__)


class Drainable(Protocol):
    async def drain(self) -> None:
        """Wait until every queued event has been written to the sockets."""


class FaultInjector:
    """Fires the ``crash_during_prompt`` / ``hang_during_prompt`` knobs once per prompt, at the
    first of: a sampler past half its steps, an output node starting, the prompt's end.

    Queued events are flushed first, so a client has seen the prompt start before it dies.
    """

    def __init__(self, env: NodeEnv, sink: Drainable) -> None:
        self._env = env
        self._sink = sink
        self._armed = False

    def arm(self) -> None:
        self._armed = True

    async def checkpoint(self, where: str) -> None:
        knobs = self._env.knobs
        if not self._armed or (knobs.crash_during_prompt is None and knobs.hang_during_prompt is None):
            return
        self._armed = False
        await self._sink.drain()
        if knobs.crash_during_prompt is not None:
            logger.error("Simulated crash during prompt (%s): %s", where, knobs.crash_during_prompt.describe())
            knobs.crash_during_prompt.trigger()
        mode = knobs.hang_during_prompt
        logger.error("Simulated hang during prompt (%s): %s", where, mode.value if mode else "")
        for handler in logging.getLogger().handlers:
            handler.flush()
        if mode is HangMode.SIGSTOP:
            os.kill(os.getpid(), signal.SIGSTOP)
            return  # resumed by SIGCONT: carry on as if nothing happened
        while True:  # HangMode.BLOCK: hold the event loop so nothing answers
            time.sleep(3600)
