"""A request that fails because a disk is full: recognised, and told as such (507).

ComfyUI says little: its `/upload/image` answers a bare HTTP 500 when it cannot write the file,
and a node that cannot write raises ``OSError: [Errno 28] No space left on device``. The wrapper
asks the filesystem of the folder in question how much room it has, and tells the client what is
full and how to fix it, instead of "Internal error in the wrapper."
"""

from __future__ import annotations

import errno
from pathlib import Path

from api.host.disk import format_bytes, room

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]")
#: What to do, in every message: the settings that keep the disk bounded.
FIX = ("free space there, or let retention delete what finished requests left "
       "(retention.outputs, retention.outputs_max_gb, retention.inputs; docs/disk.md)")


class DiskFull(Exception):
    """A request could not go on: a folder it needs is on a full filesystem. The message is
    meant for the client."""


def is_full_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS


def says_full(text: str | None) -> bool:
    """ComfyUI's words (an execution error's message) for a full disk."""
    return bool(text) and any(word in text for word in _FULL_WORDS)


def upload_refused(what: str, folder: Path, size: int, status: int) -> DiskFull | None:
    """ComfyUI refused to store a `size`-byte upload into `folder` (HTTP `status`): a DiskFull
    when that folder has less room than the file, else None (the failure is something else).
    Blocking: run it in a thread."""
    found = room(folder)
    if found is None or found.free >= size:
        return None
    return DiskFull(f"disk full: ComfyUI answered HTTP {status} to the upload of {what} "
                    f"({format_bytes(size)}), and its input folder {found.describe()}; {FIX}")


def while_writing(what: str, folder: Path, detail: str) -> DiskFull:
    """A write into `folder` failed for want of space (blocking: run it in a thread)."""
    found = room(folder)
    where = found.describe() if found is not None else str(folder)
    return DiskFull(f"disk full: {what} failed ({detail}); {where}; {FIX}")


def room_text(folder: Path, what: str = "output folder") -> str:
    """`output folder /x 100% full (0 B free)`, or "" when nothing of it is here (blocking)."""
    found = room(folder)
    return f"{what} {found.describe()}" if found is not None else ""
