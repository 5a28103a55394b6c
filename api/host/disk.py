"""Free space on this host: the filesystem holding a folder, asked with statvfs.

Blocking (statvfs can wait on a network filesystem): call `room` through ``asyncio.to_thread``.
Sizes are in bytes and shown in decimal units, as ``df -H`` shows them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Room:
    """The filesystem that holds `path`: its identity, size and free space (for us, not root)."""

    path: Path
    device: int
    free: int       # bytes an unprivileged writer may still use (statvfs f_bavail)
    total: int      # used + free: the size that `percent_full` is of, as df counts it

    @property
    def used(self) -> int:
        return self.total - self.free

    @property
    def percent_full(self) -> float:
        return 100.0 * self.used / self.total if self.total else 100.0

    def describe(self) -> str:
        """`/opt/ComfyUI/output 97% full (2.1 GB free)`."""
        return f"{self.path} {self.percent_full:.0f}% full ({format_bytes(self.free)} free)"


def room(path: Path) -> Room | None:
    """Blocking: the filesystem where `path` is, asked at its nearest existing parent (a folder
    ComfyUI has not made yet is on its parent's filesystem); None when nothing of it exists."""
    probe = Path(path)
    while True:
        try:
            st = os.statvfs(probe)
            device = os.stat(probe).st_dev
            break
        except FileNotFoundError:
            if probe.parent == probe:
                return None
            probe = probe.parent
        except OSError:
            return None
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    free = st.f_bavail * st.f_frsize
    return Room(Path(path), device, free, used + free)


def format_bytes(count: float) -> str:
    """2.1 GB, 340.0 MB, 0 B: decimal units."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"
