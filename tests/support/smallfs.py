"""A small real filesystem for tests of a full disk: a size-limited tmpfs, mounted by the test.

Mounting needs root (CAP_SYS_ADMIN); where the test run has not got it, the test is skipped and
says why. The mount is lazily unmounted at the end, even if a process still holds a file there.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_filesystem(where: Path, megabytes: int) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a small filesystem for this test is a tmpfs the test mounts: needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0755",
                              "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def unique_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`, each inode once (a link and its original are one)."""
    seen, total = set(), 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total
