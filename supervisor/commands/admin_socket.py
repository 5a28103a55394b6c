"""The commands' side of the daemon's admin socket: which socket, and one request to it.

`request` (and `ask`, its blocking form) is how every command talks to the daemon; when the
daemon does not answer it raises `DaemonUnreachable` saying why in an operator's words (not
running, a stale socket, permission denied, no answer in time).

Which socket, when none is named: the demo leaves a note with its socket's path in a per-user
runtime folder (so `comfy-worker health` finds a running `make demo` without
`WORKER_ADMIN_SOCKET`), and the commands look, in order, at:
`--socket`; `worker.admin_socket` when it was set (file or environment); the default socket when
it exists; the note of a running demo; and last the default path (whose absence the command then
reports as "the daemon is not running").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from config import Settings
from supervisor.commands.app import DaemonUnreachable
from supervisor.reporting.admin import admin_request


def _runtime_folder() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"comfy-worker-{os.getuid()}"


def note_path() -> Path:
    """Where a running demo writes its admin socket's path."""
    return _runtime_folder() / "demo-admin-socket"


def announce_demo_socket(socket: Path) -> None:
    """Called by `comfy-worker demo`: let the admin commands find this demo's socket."""
    folder = _runtime_folder()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    note = note_path()
    partial = note.with_name(note.name + ".partial")
    partial.write_text(str(socket.resolve()) + "\n")
    os.replace(partial, note)


def forget_demo_socket(socket: Path) -> None:
    with contextlib.suppress(OSError):
        if note_path().read_text().strip() == str(socket.resolve()):
            note_path().unlink()


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def locate(settings: Settings, explicit: str | None = None) -> Path:
    """The admin socket to use (see the module docstring for the order)."""
    if explicit:
        return Path(explicit)
    configured = Path(settings.worker.admin_socket)
    if settings.source("worker.admin_socket").kind != "default" or _is_socket(configured):
        return configured
    with contextlib.suppress(OSError):
        noted = Path(note_path().read_text().strip())
        if _is_socket(noted):
            return noted
    return configured


def ask(socket: Path, method: str, route: str, timeout: float = 5.0) -> dict[str, Any]:
    """`request`, for a command that is not async."""
    return asyncio.run(request(socket, method, route, timeout))


async def request(socket: Path, method: str, route: str, timeout: float = 5.0) -> dict[str, Any]:
    """The daemon's JSON answer on its admin socket; raises `DaemonUnreachable`."""
    try:
        answer = await admin_request(socket, method, route, timeout=timeout)
    except aiohttp.ClientConnectorError as exc:
        raise DaemonUnreachable(_connect_problem(socket, exc.os_error)) from None
    except aiohttp.ClientResponseError as exc:
        raise DaemonUnreachable(f"the daemon answered HTTP {exc.status} on {socket}") from None
    except asyncio.TimeoutError:
        raise DaemonUnreachable(f"the daemon did not answer on {socket} within {timeout:g} s "
                                "(is its event loop stuck?)") from None
    except aiohttp.ContentTypeError:
        raise DaemonUnreachable(f"the daemon's answer on {socket} was not JSON") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise DaemonUnreachable(f"cannot talk to the daemon on {socket}: "
                                f"{exc.__class__.__name__} {exc}".rstrip()) from None
    if not isinstance(answer, dict):
        raise DaemonUnreachable(f"the daemon's answer on {socket} was not a JSON object")
    return answer


def _connect_problem(socket: Path, error: OSError) -> str:
    if isinstance(error, FileNotFoundError):
        return f"the daemon is not running (no admin socket at {socket})"
    if isinstance(error, ConnectionRefusedError):
        return f"the daemon is not running ({socket} refuses connections: a stale socket)"
    if isinstance(error, PermissionError):
        return (f"permission denied on {socket}: the socket is mode 0660, run as root or as a "
                "member of its group")
    return f"cannot connect to {socket}: {error}"
