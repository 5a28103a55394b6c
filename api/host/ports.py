"""Who listens on a port: never mistake a stranger for our own child.

A probe that gets an answer only proves that *something* listens on the port. On a real host
that can be a leftover ComfyUI, a `make demo` left running, another user's server: our own child
then dies with "address already in use" while the probe, answered by the stranger, would call it
ready and the worker would send work to a process it does not own. So before a child counts as
ready, the listening socket must belong to the child's process tree, and when it does not the
reason names the holder: ``port 18188 is held by pid 1234 (python main.py --port 18188 ...), not
by our ComfyUI (pid 5678)``.

Everything here reads /proc through psutil and is blocking: call it through
``asyncio.to_thread``. Another user's process shows no pid (the kernel does not tell us); it is
then named as "a process of another user".
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

import psutil

from api.host.processes import RunningCommand, process_tree, running_command

logger = logging.getLogger(__name__)

#: Longest command line quoted in a message.
_COMMAND_CHARS = 80
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""}


@dataclass(frozen=True)
class Holder:
    """A process listening on a port; ``pid`` None when it belongs to another user."""

    pid: int | None
    command: str

    def describe(self) -> str:
        if self.pid is None:
            return "a process of another user (its pid is not visible to us)"
        return f"pid {self.pid} ({self.command})" if self.command else f"pid {self.pid}"


def local_port(url: str) -> int | None:
    """The port of ``url`` when it points at this machine (else None: nothing to check)."""
    parts = urlsplit(url)
    if (parts.hostname or "") not in _LOCAL_HOSTS:
        return None
    return parts.port or (443 if parts.scheme == "https" else 80)


def _command(pid: int) -> str:
    try:
        words = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""
    text = " ".join(words)
    return text if len(text) <= _COMMAND_CHARS else text[:_COMMAND_CHARS - 4] + " ..."


def holders(port: int) -> list[Holder]:
    """Every process listening on TCP ``port`` (any address)."""
    try:
        connections = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError) as exc:
        logger.debug("cannot list sockets: %s", exc)
        return []
    found: dict[int | None, Holder] = {}
    for conn in connections:
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port != port:
            continue
        if conn.pid not in found:
            found[conn.pid] = Holder(conn.pid, _command(conn.pid) if conn.pid else "")
    return list(found.values())


def stranger_on_port(port: int, pid: int | None, who: str) -> str | None:
    """None when ``pid``'s process tree listens on ``port`` (or nobody visible does); else the
    reason, naming the holder. ``who`` reads like "our ComfyUI"."""
    listening = holders(port)
    if not listening:
        return None
    ours = process_tree(pid) if pid else set()
    if any(h.pid in ours for h in listening):
        return None
    stranger = listening[0]
    mine = f"pid {pid}" if pid else "not running"
    return f"port {port} is held by {stranger.describe()}, not by {who} ({mine})"


def held_within(port: int, root_pid: int) -> bool:
    """True when something listens on ``port`` and every listener belongs to ``root_pid``'s
    process tree (the wrapper asks this of the daemon that started both it and ComfyUI)."""
    listening = holders(port)
    if not listening:
        return False
    ours = process_tree(root_pid)
    return all(holder.pid in ours for holder in listening)


def listener_command(port: int, root_pid: int) -> RunningCommand | None:
    """The command line and working folder of the process in ``root_pid``'s tree that listens
    on ``port`` (a script's own pid when it ``exec``s the server), or None when none is visible."""
    ours = process_tree(root_pid)
    for holder in holders(port):
        if holder.pid is not None and holder.pid in ours:
            found = running_command(holder.pid)
            if found is not None:
                return found
    return None


def describe_bind_error(port: int, exc: OSError) -> str:
    """A bind failure in words; for "address in use", who holds the port."""
    if exc.errno == errno.EADDRINUSE:
        found = holders(port)
        if found:
            return f"port {port} is already held by {found[0].describe()}"
        return f"port {port} is already in use"
    return f"cannot listen on port {port}: {exc.strerror or exc}"
