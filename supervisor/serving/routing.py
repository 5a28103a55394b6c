"""One FIFO for the host, many instances behind it: who runs the next request.

ComfyUI runs one prompt at a time, so each instance has room for `depth` requests: the one it
runs and the one waiting inside its wrapper (and ComfyUI's own queue), so it starts that one the
moment the current one ends instead of a round trip later. Requests beyond that wait here, in
arrival order, and each goes to the serving instance with the most room (the lowest number on a
tie), so N instances run N requests at once.

When an instance's ComfyUI dies, only the request it was running fails at once (the client reads
why). The ones queued behind it in that instance move to the head of the line for another
instance when there is another; with one instance they stay in its wrapper, which gives them to
the restarted ComfyUI. While no instance takes work but one is on its way back (a restart),
waiting requests wait it out for up to `hold` seconds; otherwise they are turned away (503).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

logger = logging.getLogger(__name__)


class Aborted(Exception):
    """The request in flight was failed from outside: ComfyUI died, or the worker is stopping."""


class NotServing(Exception):
    """No instance takes work any more; the request waited and is turned away."""


class Routable(Protocol):
    number: int

    @property
    def accepting(self) -> bool: ...


@dataclass
class _Ticket:
    instance: Any
    seq: int
    request_id: str | None = None
    abort_reason: str | None = None
    requeue: bool = False
    handed_at: float = 0.0      # time.monotonic() when the instance got it


@dataclass(frozen=True)
class Handed:
    """What one instance holds now: when each of its requests was handed to it (oldest first,
    monotonic seconds) and when it last finished one (None: not yet)."""

    handed_at: tuple[float, ...]
    last_done_at: float | None


class Router:
    def __init__(self, max_waiting: int, depth: int = 2, *,
                 restarting: Callable[[], bool] = lambda: False, hold: float = 60.0):
        self.max_waiting = max_waiting
        self.depth = depth
        self.restarting = restarting   # an instance is on its way back: worth waiting for
        self.hold = hold
        self._none_since: float | None = None
        self.instances: list[Any] = []
        self._load: dict[int, int] = {}
        self._queue: deque[asyncio.Future] = deque()
        self._in_flight: dict[asyncio.Future, _Ticket] = {}
        self._seq = itertools.count()
        self._last_done: dict[int, float] = {}

    def add(self, instance: Any) -> None:
        self.instances.append(instance)
        self._load[instance.number] = 0

    # --- figures --------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._queue if not w.done())

    @property
    def busy(self) -> bool:
        return bool(self._in_flight)

    def load(self, number: int) -> int:
        """Requests handed to that instance and not answered yet."""
        return self._load.get(number, 0)

    def running_on(self, number: int) -> int:
        return sum(1 for t in self._in_flight.values() if t.instance.number == number)

    def handed(self, number: int) -> Handed:
        """The requests instance `number` holds now, for an estimate of the wait."""
        times = sorted(t.handed_at for t in self._in_flight.values()
                       if t.instance.number == number)
        return Handed(tuple(times), self._last_done.get(number))

    def full(self) -> bool:
        return self._pick() is None and self.waiting >= self.max_waiting

    # --- routing --------------------------------------------------------------------------------
    def _pick(self) -> Any | None:
        best = None
        for instance in self.instances:
            load = self._load[instance.number]
            if instance.accepting and load < self.depth and \
                    (best is None or load < self._load[best.number]):
                best = instance
        return best

    def _pump(self) -> None:
        while self._queue:
            waiter = self._queue[0]
            if waiter.done():
                self._queue.popleft()
                continue
            instance = self._pick()
            if instance is None:
                return
            self._queue.popleft()
            self._load[instance.number] += 1
            waiter.set_result(instance)

    def _hold_over(self) -> bool:
        """No instance takes work, and none is coming back soon enough to wait for."""
        if any(i.accepting for i in self.instances):
            self._none_since = None
            return False
        now = time.monotonic()
        if self._none_since is None:
            self._none_since = now
        return not self.restarting() or now - self._none_since > self.hold

    def changed(self) -> None:
        """An instance started or stopped taking work: hand out room, or turn the line away.
        Also called once a second, so a hold runs out on time."""
        if self._hold_over():
            while self._queue:
                waiter = self._queue.popleft()
                if not waiter.done():
                    waiter.set_exception(NotServing())
            return
        for instance in self.instances:
            if not instance.accepting:
                self._move_queued(instance)
        self._pump()

    async def _acquire(self, front: bool) -> Any:
        if not self._queue:
            instance = self._pick()
            if instance is not None:
                self._load[instance.number] += 1
                return instance
        if self._hold_over():
            raise NotServing()
        waiter = asyncio.get_running_loop().create_future()
        if front:
            self._queue.appendleft(waiter)
        else:
            self._queue.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())   # given room just as the client left
            raise

    def _release(self, instance: Any) -> None:
        self._load[instance.number] -= 1
        self._pump()

    async def run(self, work: Callable[[Any], Awaitable[Any]], on_start: Callable[[], None],
                  request_id: str | None = None) -> Any:
        """Run `work(instance)` on the first instance with room; `on_start` once it is handed
        over. Raises Aborted (fail the request, 502) or NotServing (503)."""
        started = False
        front = False
        while True:
            instance = await self._acquire(front)
            ticket = _Ticket(instance, next(self._seq), request_id, handed_at=time.monotonic())
            future = asyncio.ensure_future(work(instance))
            self._in_flight[future] = ticket
            try:
                if not started:
                    started = True
                    on_start()
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                if future.cancelled() and ticket.requeue:
                    logger.info("request moved off instance %d (it went down before running "
                                "it)", instance.number)
                    front = True
                    continue
                if future.cancelled() and ticket.abort_reason is not None:
                    raise Aborted(ticket.abort_reason) from None
                future.cancel()  # our own client went away
                raise
            finally:
                del self._in_flight[future]
                if future.done() and not future.cancelled():
                    self._last_done[instance.number] = time.monotonic()
                self._release(instance)

    # --- failing work from outside --------------------------------------------------------------
    def _tickets(self, number: int) -> list[tuple[asyncio.Future, _Ticket]]:
        return sorted(((f, t) for f, t in self._in_flight.items()
                       if t.instance.number == number and not f.done() and not t.requeue
                       and t.abort_reason is None),
                      key=lambda item: item[1].seq)

    def _move_queued(self, instance: Any, keep_oldest: bool = True) -> int:
        """Requests handed to `instance` go back to the head of the line (only when another
        instance may take them); `keep_oldest` leaves the one it runs."""
        if len(self.instances) < 2:
            return 0
        tickets = self._tickets(instance.number)
        moved = 0
        for future, ticket in tickets[1:] if keep_oldest else tickets:
            ticket.requeue = True
            future.cancel()
            moved += 1
        return moved

    def abort_running(self, instance: Any, reason: str, request_id: str | None,
                      known: bool) -> bool:
        """The instance's ComfyUI died: the request it ran fails now with `reason` (the whole
        message its client reads). With `known`, `request_id` is the one its wrapper says runs
        (None: none runs); else the oldest handed to it is taken, as ComfyUI runs them in order.
        The ones queued behind it move to another instance (with one, they stay in the wrapper,
        which runs them on the restarted ComfyUI)."""
        failed = False
        for future, ticket in self._tickets(instance.number):
            if known and ticket.request_id != request_id:
                continue
            ticket.abort_reason = reason
            future.cancel()
            failed = True
            break
        self._move_queued(instance, keep_oldest=False)
        return failed

    def abort_all(self, reason: str) -> bool:
        """Fail every request in flight now (the worker stops): each client gets a 502."""
        aborted = False
        for future, ticket in list(self._in_flight.items()):
            if not future.done():
                ticket.abort_reason = reason
                ticket.requeue = False
                future.cancel()
                aborted = True
        return aborted
