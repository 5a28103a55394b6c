"""ComfyUI's folders, asked of the ComfyUI process we started instead of guessed.

The configured command often is a script (``comfyui-cmd.sh BASE PORT``) that hides ComfyUI's
``--base-directory``; reading only the configured command then puts the folders under
``comfyui.install_path``, and files fetched through ``GET /view`` land in the ComfyUI checkout.
Once our ComfyUI is confirmed to own its port, the process listening there is ComfyUI itself:
its command line and working folder (read from /proc through psutil) are exact, relative paths
included. This module reads them; `config.comfy_folders.from_running` turns them into folders.

Blocking (psutil reads /proc): call `running_folders` through ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import psutil

from config.comfy_folders import ComfyFolders, from_running
from supervisor.ports import holders, process_tree

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunningCommand:
    pid: int
    argv: list[str]
    cwd: Path | None


def running_command(port: int, root_pid: int) -> RunningCommand | None:
    """The command line and working folder of the process in ``root_pid``'s tree that listens
    on ``port`` (the script's own pid when it ``exec``s ComfyUI), or None when none is visible."""
    ours = process_tree(root_pid)
    for holder in holders(port):
        if holder.pid is None or holder.pid not in ours:
            continue
        try:
            process = psutil.Process(holder.pid)
            argv = process.cmdline()
            try:
                cwd: Path | None = Path(process.cwd())
            except (psutil.AccessDenied, OSError):
                cwd = None
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess) as exc:
            logger.debug("cannot read pid %d: %s", holder.pid, exc)
            continue
        return RunningCommand(holder.pid, argv, cwd)
    return None


def running_folders(port: int, root_pid: int, install_path: Path | None,
                    explicit: dict[str, Path | None]) -> ComfyFolders | None:
    """ComfyUI's folders according to its running command, or None when that says nothing
    more than the guess (no folder flags, or the process is not readable)."""
    found = running_command(port, root_pid)
    if found is None:
        return None
    return from_running(found.argv, found.cwd, install_path, explicit,
                        source=f"ComfyUI's running command (pid {found.pid})")
