"""Ports and waiting, for the tests and the perf scripts: free loopback ports, a GET's status,
polling a condition with a deadline."""

from __future__ import annotations

import contextlib
import random
import socket
import time
import urllib.error
import urllib.request
from typing import Callable, TypeVar

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


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise PerfError(f"timed out after {timeout:g} s waiting for {what}")
