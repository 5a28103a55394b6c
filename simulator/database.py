"""Where the newest ComfyUI keeps its asset database, and the lock that allows one process per
database.

The database is ``<user directory>/comfyui.db`` unless ``--database-url sqlite:///PATH`` names
another file (``sqlite:///:memory:`` or ``sqlite://``: in memory, no file, no lock). While a
process uses a file database it holds an exclusive ``flock`` on ``<db>.lock``; the kernel
releases it when the process dies, however it dies. A second process waits for the lock (5 s
in ComfyUI), then stops with ``ASSETS_STARTUP_FAILED: in_use``.

Only the assets system uses the database: with ``--disable-assets`` ComfyUI takes no lock and
only warns, after start-up, when another process holds it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import time
from dataclasses import dataclass

from simulator.errors import AssetsStartupFailed

logger = logging.getLogger(__name__)

LOCK_WAIT_SECONDS = 5.0
_POLL_SECONDS = 0.05
WITHOUT_ASSETS = "Or start ComfyUI without the assets system: --disable-assets"
MISSING_PACKAGES = ("sqlalchemy", "alembic", "blake3")


@dataclass(frozen=True)
class DatabaseLocation:
    url: str
    path: str | None  # None: in memory
    given: bool  # --database-url was given

    @property
    def lock_path(self) -> str | None:
        return self.path + ".lock" if self.path is not None else None


def locate_database(database_url: str | None, user_dir: str) -> DatabaseLocation:
    """Raises ``AssetsStartupFailed("unsupported_url")`` for a URL that is not SQLite."""
    if database_url is None:
        path = os.path.join(user_dir, "comfyui.db")
        return DatabaseLocation("sqlite:///" + path, path, given=False)
    if database_url in ("sqlite:///:memory:", "sqlite://"):
        return DatabaseLocation(database_url, None, given=True)
    if not database_url.startswith("sqlite:///"):
        raise AssetsStartupFailed("unsupported_url", (
            "--database-url must start with sqlite:///, like sqlite:///path/to/comfyui.db, "
            f"or be left out to use the default database.\n{WITHOUT_ASSETS}"))
    # sqlite:///relative.db is relative to the working folder; sqlite:////abs/x.db is absolute.
    path = database_url[len("sqlite:///"):].split("?", 1)[0]
    return DatabaseLocation(database_url, os.path.abspath(path), given=True)


class DatabaseLock:
    """An exclusive ``flock`` on ``<db>.lock``, held until ``release`` or the process's end."""

    def __init__(self, location: DatabaseLocation) -> None:
        self.location = location
        self._fd: int | None = None

    def acquire(self, wait_seconds: float = LOCK_WAIT_SECONDS) -> None:
        """Take the lock, waiting up to ``wait_seconds`` for a holder to let go.

        Blocking (start-up runs before the event loop exists). Raises ``AssetsStartupFailed``
        (``in_use``) when it stays held, (``not_writable`` / ``path_blocked``) when the file
        cannot be made.
        """
        lock_path = self.location.lock_path
        if lock_path is None:
            return
        try:
            os.makedirs(os.path.dirname(lock_path), exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileExistsError, NotADirectoryError) as ex:
            raise AssetsStartupFailed("path_blocked", _advice(
                f"A file is in the way of the folder for the asset database '{self.location.path}' ({ex}).",
                "Move that file, or choose another folder.")) from ex
        except OSError as ex:
            raise AssetsStartupFailed("not_writable", _advice(
                f"ComfyUI can't create, open or write the asset database '{self.location.path}' ({ex}).",
                "Make sure its folder is a writable directory and no other program has the file open.")) from ex
        if not _try_lock(fd):
            logger.info("Database lock is held; waiting up to %gs for it to be released", wait_seconds)
            deadline = time.monotonic() + wait_seconds
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise AssetsStartupFailed("in_use", _in_use_advice(self.location))
                time.sleep(_POLL_SECONDS)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def held_by_another(location: DatabaseLocation) -> bool:
    """Whether another process holds the lock; never waits, never keeps it, creates no file."""
    lock_path = location.lock_path
    if lock_path is None or not os.path.exists(lock_path):
        return False
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except OSError:
        return False
    try:
        if _try_lock(fd):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


def in_use_warning(location: DatabaseLocation) -> str:
    """What a process started with --disable-assets says when another one holds the lock."""
    bar = "_" * 72
    return (f"\n{bar}\nWARNING WARNING WARNING WARNING WARNING\n\n"
            f"Another ComfyUI is already using this install's asset database:\n  {location.path}\n"
            "This one runs with --disable-assets: it leaves that database alone and starts anyway."
            f"\n{bar}")


def missing_packages_failure() -> AssetsStartupFailed:
    """As when sqlalchemy, alembic and blake3 cannot be imported: the marker line first, then
    several lines of advice (so the last line a launcher sees is advice, not the marker)."""
    return AssetsStartupFailed("missing_packages", "\n".join([
        f"The assets system needs packages that could not be imported: {', '.join(MISSING_PACKAGES)}.",
        "Install the packages ComfyUI's requirements.txt lists, in the Python that runs it:",
        f"{sys.executable} -m pip install -r requirements.txt",
        WITHOUT_ASSETS,
    ]))


def _in_use_advice(location: DatabaseLocation) -> str:
    lines = [f"Another ComfyUI is already using this database: '{location.path}'.",
             "Stop the other ComfyUI, then start this one again."]
    if not location.given:
        lines.append("Or give this one a database of its own: --database-url sqlite:///path/to/another.db")
    return "\n".join([*lines, WITHOUT_ASSETS])


def _advice(what: str, fix: str) -> str:
    return "\n".join([what, fix, WITHOUT_ASSETS])
