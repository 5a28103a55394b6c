"""Talk to systemd's service manager (sd_notify protocol), without libsystemd.

The protocol is one datagram per message on the AF_UNIX socket named by
``NOTIFY_SOCKET``: newline-separated ``KEY=VALUE`` assignments.  A path starting with
``@`` names an abstract socket.  Without ``NOTIFY_SOCKET`` (run by hand, in a container,
in tests) every call is a cheap no-op, so callers never need to ask first.

Sending never blocks and never raises: the socket is non-blocking and a failure is
logged once at WARNING (later ones at DEBUG), because a lost status line must not take
the worker down.  The watchdog is the exception that proves the rule: if pings keep
failing, systemd restarts us, which is the behaviour we want.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

#: Environment variables systemd sets for the main process only.  Children must not
#: inherit them (see :func:`strip_notify_env`).
NOTIFY_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def strip_notify_env(env: dict[str, str]) -> dict[str, str]:
    """Remove the sd_notify variables from a child's environment (in place, returned).

    With ``NotifyAccess=main`` systemd ignores children anyway; removing the variables
    also keeps a child that speaks sd_notify from wasting effort or logging errors.
    """
    for name in NOTIFY_ENV_VARS:
        env.pop(name, None)
    return env


def _socket_address(raw: str) -> str | None:
    """Turn ``NOTIFY_SOCKET`` into an address for ``sendto`` (None when unusable)."""
    if raw.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of the '@'.
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # vsock addresses (vsock:CID:PORT) exist for VMs; this worker never runs that way.
    return None


def _one_line(text: str) -> str:
    # A newline would start a new assignment and could smuggle in READY=1 or similar.
    return " ".join(text.splitlines())


class SystemdNotifier:
    """Sends ``READY=1``, ``STATUS=...``, ``WATCHDOG=1`` and ``STOPPING=1`` to systemd.

    ``env`` defaults to ``os.environ`` and is read once, at construction.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        source = os.environ if env is None else env
        raw = source.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            logger.warning("NOTIFY_SOCKET=%r is not a path or @abstract name; sd_notify disabled", raw)
        self._watchdog_usec = source.get("WATCHDOG_USEC", "")
        self._watchdog_pid = source.get("WATCHDOG_PID", "")
        self._sock: socket.socket | None = None
        self._error_logged = False

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self._address is not None

    # -- the messages -------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete (``Type=notify`` units leave "activating")."""
        return self._send("READY=1", status)

    def status(self, text: str) -> bool:
        """One line shown by ``systemctl status``."""
        return self._send(None, text)

    def watchdog(self) -> bool:
        """Keep-alive ping; must arrive at least every ``WatchdogSec``."""
        return self._send("WATCHDOG=1", None)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        return self._send("STOPPING=1", status)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time for the current start or stop phase (from now)."""
        return self._send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}", None)

    def notify(self, *assignments: str) -> bool:
        """Send raw ``KEY=VALUE`` assignments in one datagram."""
        return self._send_text("\n".join(_one_line(a) for a in assignments))

    # -- watchdog -----------------------------------------------------------------

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None.

        None when the watchdog is off, the value is invalid, or ``WATCHDOG_PID`` names
        another process (the variables were inherited, not meant for us).
        """
        if not self.enabled or not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    async def watchdog_loop(self, healthy: Callable[[], bool] | None = None) -> None:
        """Ping the watchdog forever at :meth:`watchdog_interval`; cancel to stop.

        Because the ping comes from the event loop, a blocked loop stops the pings and
        systemd restarts the service.  ``healthy`` may veto a ping (return False) to
        let systemd restart a daemon that is alive but wedged.  Returns at once when
        the watchdog is not enabled.
        """
        interval = self.watchdog_interval()
        if interval is None:
            return
        logger.debug("systemd watchdog: pinging every %.1f s", interval)
        while True:
            if healthy is None or healthy():
                self.watchdog()
            else:
                logger.warning("systemd watchdog: health check failed, not pinging")
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- sending ------------------------------------------------------------------

    def _send(self, flag: str | None, status: str | None) -> bool:
        parts = []
        if flag:
            parts.append(flag)
        if status is not None:
            parts.append("STATUS=" + _one_line(status))
        return self._send_text("\n".join(parts))

    def _send_text(self, text: str) -> bool:
        if self._address is None or not text:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(text.encode("utf-8"), self._address)
        except OSError as exc:
            level = logging.DEBUG if self._error_logged else logging.WARNING
            self._error_logged = True
            logger.log(level, "sd_notify to %s failed: %s (further failures logged at DEBUG)",
                       self._address.replace("\0", "@"), exc)
            return False
        return True
