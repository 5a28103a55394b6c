"""Which admin socket the admin commands talk to, when none is named.

`comfy-worker health` (and `restart-comfyui`, `drain`, `resume`, `benchmark`) used to need the
socket of a running `make demo` spelled out in `WORKER_ADMIN_SOCKET`. Now the demo leaves a note
with its socket's path in a per-user runtime folder, and the commands look, in order, at:
`--socket`; `worker.admin_socket` when it was set (file or environment); the default socket when
it exists; the note of a running demo; and last the default path (whose absence the command then
reports as "the daemon is not running").
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from config import Settings


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
