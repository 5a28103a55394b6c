"""Ports and waiting, for the tests and the perf scripts: free loopback ports, a GET's status,
polling a condition with a deadline that a busy machine stretches."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import socket
import time
import urllib.error
import urllib.request
from typing import Callable, TypeVar

from tests.support.timing import slowness

T = TypeVar("T")


class PerfError(Exception):
    """A process did not start or a request failed (a perf script stops; a test fails)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free ports (instance i of a multi-GPU worker listens on
    the base port + i)."""
    for _ in range(200):
        base = random.randint(20000, 60000 - count)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no run of {count} free ports found")


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


def _stretched(deadline: float, timeout: float, stretched: bool) -> float | None:
    """At a deadline: a later one by the machine's measured slowness, once; None to give up."""
    if stretched:
        return None
    factor = slowness()
    return deadline + timeout * (factor - 1) if factor > 1.05 else None


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """`predicate()`'s first truthy value, polled every `interval` s. `timeout` is what an idle
    machine needs at most; at the deadline it stretches once by how busy the machine measures
    (tests/support/timing.py), so a busy machine does not fail a wait that only catches hangs."""
    deadline, stretched = time.monotonic() + timeout, False
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            later = _stretched(deadline, timeout, stretched)
            if later is None:
                raise PerfError(f"timed out after {timeout:g} s (and the machine's slowness) "
                                f"waiting for {what}")
            deadline, stretched = later, True
        time.sleep(interval)


async def eventually(predicate: Callable[[], object], timeout: float = 5.0, what: str = "the condition",
                     interval: float = 0.01) -> object:
    """`wait_until` for async tests: the event loop keeps running while it waits; `predicate`
    may be a coroutine function."""
    deadline, stretched = time.monotonic() + timeout, False
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            later = _stretched(deadline, timeout, stretched)
            if later is None:
                raise PerfError(f"timed out after {timeout:g} s (and the machine's slowness) "
                                f"waiting for {what}")
            deadline, stretched = later, True
        await asyncio.sleep(interval)
