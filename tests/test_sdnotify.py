"""SystemdNotifier against a real AF_UNIX datagram socket, as systemd provides one."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from supervisor.sdnotify import SystemdNotifier, strip_notify_env
from tests.support.timing import allowance


@pytest.fixture
def receiver():
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        path = str(Path(d) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2)
        yield path, sock
        sock.close()


@pytest.fixture
def notifier():
    """SystemdNotifier factory; closes every notifier's socket afterwards."""
    made: list[SystemdNotifier] = []

    def make(env):
        n = SystemdNotifier(env)
        made.append(n)
        return n

    yield make
    for n in made:
        n.close()


def received(sock: socket.socket, count: int) -> list[str]:
    return [sock.recv(4096).decode() for _ in range(count)]


def test_messages_arrive_in_order(receiver, notifier):
    path, sock = receiver
    n = notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("serving")
    assert n.status("2 requests in flight")
    assert n.watchdog()
    assert n.extend_timeout(1.5)
    assert n.stopping()
    assert received(sock, 5) == [
        "READY=1\nSTATUS=serving",
        "STATUS=2 requests in flight",
        "WATCHDOG=1",
        "EXTEND_TIMEOUT_USEC=1500000",
        "STOPPING=1",
    ]


def test_abstract_socket_name(notifier):
    name = f"comfy-worker-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        n = notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert received(sock, 1) == ["READY=1"]
    finally:
        sock.close()


def test_status_cannot_smuggle_extra_assignments(receiver, notifier):
    path, sock = receiver
    n = notifier({"NOTIFY_SOCKET": path})
    n.status("model loaded\nREADY=1")
    assert received(sock, 1) == ["STATUS=model loaded READY=1"]


def test_without_notify_socket_everything_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = SystemdNotifier()
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False and n.stopping() is False
    assert n.watchdog_interval() is None


def test_send_failures_never_raise_and_are_logged_once(caplog, tmp_path, notifier):
    n = notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.DEBUG, logger="supervisor.sdnotify"):
        assert n.ready() is False
        assert n.status("x") is False
        assert n.watchdog() is False
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "sd_notify" in warnings[0].getMessage()


def test_a_full_socket_does_not_block(receiver, notifier):
    # Nobody reads: the kernel queue fills (net.unix.max_dgram_qlen) and a blocking
    # socket would hang the event loop; ours returns False instead.
    path, _sock = receiver
    n = notifier({"NOTIFY_SOCKET": path})
    started = time.monotonic()
    results = [n.status(f"update {i}") for i in range(5000)]
    assert time.monotonic() - started < allowance(2.0)
    assert results[0] is True and False in results


def test_watchdog_interval_is_half_the_period():
    base = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "60000000"}
    assert SystemdNotifier({**base, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() == 30.0
    assert SystemdNotifier(base).watchdog_interval() == 30.0
    # Inherited from a parent: not ours to ping.
    assert SystemdNotifier({**base, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval() is None
    assert SystemdNotifier({**base, "WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    assert SystemdNotifier({**base, "WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert SystemdNotifier({"WATCHDOG_USEC": "60000000"}).watchdog_interval() is None


async def test_watchdog_loop_pings_and_respects_health(receiver, notifier):
    path, sock = receiver
    sock.setblocking(False)
    n = notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})  # ping every 0.1 s

    def drain() -> list[bytes]:
        out = []
        while True:
            try:
                out.append(sock.recv(4096))
            except BlockingIOError:
                return out

    task = asyncio.create_task(n.watchdog_loop())
    await asyncio.sleep(0.35)
    task.cancel()
    pings = drain()
    assert 3 <= len(pings) <= 5 and set(pings) == {b"WATCHDOG=1"}

    task = asyncio.create_task(n.watchdog_loop(healthy=lambda: False))
    await asyncio.sleep(0.25)
    task.cancel()
    assert drain() == []


async def test_watchdog_loop_returns_when_disabled():
    await asyncio.wait_for(SystemdNotifier({}).watchdog_loop(), 1)


def test_strip_notify_env():
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2", "PATH": "/bin"}
    assert strip_notify_env(env) == {"PATH": "/bin"}
