"""Processes on this host: a process's tree, and what it was started with.

Everything here reads /proc through psutil and is blocking: call it through
``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)


def process_tree(pid: int | None) -> set[int]:
    """A process and all its descendants (ComfyUI's workers count as ComfyUI); empty for None."""
    if not pid:
        return set()
    try:
        root = psutil.Process(pid)
        return {pid, *(child.pid for child in root.children(recursive=True))}
    except psutil.Error:
        return {pid}


@dataclass(frozen=True)
class RunningCommand:
    """A process's real command line and working folder."""

    pid: int
    argv: list[str]
    cwd: Path | None


def running_command(pid: int) -> RunningCommand | None:
    """What ``pid`` runs: its command line and working folder (None when it is not readable)."""
    try:
        process = psutil.Process(pid)
        argv = process.cmdline()
        try:
            cwd: Path | None = Path(process.cwd())
        except (psutil.AccessDenied, OSError):
            cwd = None
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess) as exc:
        logger.debug("cannot read pid %d: %s", pid, exc)
        return None
    return RunningCommand(pid, argv, cwd)
