"""Logging for a remote that keeps failing, without flooding the journal.

The autoscaler may be unreachable for minutes while the worker keeps serving; one warning on
the first failure, then one every ``every`` failures, and one line when it answers again, tell
the operator everything a warning per attempt would.
"""

from __future__ import annotations

import asyncio
import logging


class FailureLog:
    """Counts consecutive failures of one kind of call and logs a sample of them."""

    def __init__(self, logger: logging.Logger, what: str, every: int = 30) -> None:
        if every < 1:
            raise ValueError("every must be at least 1")
        self._log = logger
        self._what = what
        self._every = every
        self.consecutive = 0

    def failed(self, detail: str) -> None:
        self.consecutive += 1
        if self.consecutive == 1 or self.consecutive % self._every == 0:
            self._log.warning(
                "%s failed (%s); %d failure(s) in a row, will keep trying",
                self._what,
                detail,
                self.consecutive,
            )
        else:
            self._log.debug("%s failed (%s)", self._what, detail)

    def succeeded(self) -> None:
        if self.consecutive:
            self._log.info("%s works again after %d failure(s)", self._what, self.consecutive)
        self.consecutive = 0


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set or ``timeout`` passes; True when it was set.

    Not ``asyncio.wait_for``: on Python 3.10/3.11 it can swallow a cancellation that arrives
    just as the event is set, which would leave a background loop running after ``stop()``.
    """
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()
