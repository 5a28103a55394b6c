"""Tasks a request leaves running behind it (inputs, outputs, result files, stops), kept so that
a stopping wrapper can let them finish."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for what is under way; cancel what is left."""
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        for task in pending:
            logger.warning("stopping: %s did not finish in %g s", task.get_name(), grace)
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
