"""What the wrapper's requests left on disk, read and deleted off the event loop.

Blocking functions only (call them through ``asyncio.to_thread``): a walk of the output folder
that tells each request's folder (``<output>/<request_id>/``, where `api.wrapper.outputs` links a
request's files) from ComfyUI's own files, the temp folder's old files, and deletion of a list
of paths. Nothing here decides what may go; `api.wrapper.retention` does.

Sizes count each file once however many hard links it has (a request's file and ComfyUI's
original are one inode): that is what deleting them frees.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

#: A file's identity on its filesystem: (device, inode).
Key = tuple[int, int]


@dataclass(frozen=True, slots=True)
class FileInfo:
    """One file; its path as a string (a pass holds one per file on disk: a `Path` would be
    several times the size)."""

    path: str
    key: Key
    size: int
    mtime: float


@dataclass(slots=True)
class RequestFolder:
    """``<output>/<request_id>/`` and the files in it."""

    request_id: str
    path: Path
    files: list[FileInfo] = field(default_factory=list)
    mtime: float = 0.0  # the newest of the folder's and its files' (about when it finished)

    @property
    def keys(self) -> set[Key]:
        return {f.key for f in self.files}


@dataclass
class OutputInventory:
    """The output folder as one walk found it."""

    folder: Path
    exists: bool = True
    requests: dict[str, RequestFolder] = field(default_factory=dict)
    #: ComfyUI's own files (outside request folders), by identity: what a request's link shares.
    others: dict[Key, list[FileInfo]] = field(default_factory=dict)
    bytes: int = 0       # each inode once
    files: int = 0       # names, links included
    scanned_at: float = field(default_factory=time.time)


def _info(entry: os.DirEntry) -> FileInfo | None:
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return FileInfo(entry.path, (st.st_dev, st.st_ino), st.st_size, st.st_mtime)


def _walk(folder: str) -> Iterable[FileInfo]:
    """Every regular file under `folder` (symlinks are not followed, nor listed)."""
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    else:
                        info = _info(entry)
                        if info is not None:
                            yield info
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("retention: cannot read %s: %s", current, exc)


class FolderCache:
    """What earlier walks found in request folders that have not changed since.

    A finished request's folder is written once (its links) and then only deleted, so a pass
    need not open it again while its modification time stays the same: the walk reads the
    output folder's top level (one directory) and only the request folders that are new or
    changed. That keeps a pass's cost, and the memory it churns through, near what the
    folder's top level holds, however many requests' files are kept. A folder changed within
    `SETTLE_NS` of the walk is not cached (a file system's clock is coarse: a link made in
    the same tick would leave the time as it was), nor one with folders inside.
    Bounded by the request folders on disk: each walk forgets those it did not find."""

    SETTLE_NS = 2_000_000_000

    def __init__(self) -> None:
        self._folders: dict[str, tuple[int, RequestFolder]] = {}

    def get(self, path: str, mtime_ns: int) -> RequestFolder | None:
        found = self._folders.get(path)
        if found is None or found[0] == mtime_ns:
            return found[1] if found is not None else None
        del self._folders[path]  # changed since: walked again
        return None

    def put(self, path: str, mtime_ns: int, request: RequestFolder) -> None:
        if time.time_ns() - mtime_ns >= self.SETTLE_NS:
            self._folders[path] = (mtime_ns, request)

    def keep_only(self, paths: Iterable[str]) -> None:
        paths = set(paths)
        self._folders = {k: v for k, v in self._folders.items() if k in paths}

    def __len__(self) -> int:
        return len(self._folders)


def _request_folder(entry: os.DirEntry, st: os.stat_result) -> tuple[RequestFolder, bool]:
    """A request's folder as a walk finds it, and whether it holds no folder (cacheable)."""
    request = RequestFolder(entry.name, Path(entry.path), mtime=st.st_mtime)
    flat = True
    for info in _walk(entry.path):
        request.files.append(info)
        request.mtime = max(request.mtime, info.mtime)
        flat = flat and os.path.dirname(info.path) == entry.path
    return request, flat


def scan_outputs(folder: Path, is_request: Callable[[str], bool],
                 cache: FolderCache | None = None) -> OutputInventory:
    """Blocking: walk the output folder. A folder directly under it whose name
    `is_request` accepts is that request's; everything else is ComfyUI's. With `cache`,
    request folders unchanged since an earlier walk are not opened again."""
    inventory = OutputInventory(folder)
    try:
        top = os.scandir(folder)  # read as it goes: a listing of the whole folder is not kept
    except FileNotFoundError:
        inventory.exists = False
        return inventory
    except OSError as exc:
        logger.warning("retention: cannot read the output folder %s: %s", folder, exc)
        inventory.exists = False
        return inventory
    with top:
        _scan_top(top, inventory, is_request, cache)
    if cache is not None:
        cache.keep_only(str(r.path) for r in inventory.requests.values())
    return inventory


def _scan_top(top: Iterable[os.DirEntry], inventory: OutputInventory,
              is_request: Callable[[str], bool], cache: FolderCache | None) -> None:
    seen: set[Key] = set()

    def count(info: FileInfo) -> None:
        inventory.files += 1
        if info.key not in seen:
            seen.add(info.key)
            inventory.bytes += info.size

    for entry in top:
        if entry.is_dir(follow_symlinks=False):
            if is_request(entry.name):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                request = cache.get(entry.path, st.st_mtime_ns) if cache is not None else None
                if request is None:
                    request, flat = _request_folder(entry, st)
                    if cache is not None and flat:
                        cache.put(entry.path, st.st_mtime_ns, request)
                for info in request.files:
                    count(info)
                inventory.requests[entry.name] = request
                continue
            infos: Iterable[FileInfo] = _walk(entry.path)
        else:
            info = _info(entry)
            infos = [info] if info is not None else []
        for info in infos:
            inventory.others.setdefault(info.key, []).append(info)
            count(info)


def old_files(folder: Path, max_age: float, now: float | None = None) -> list[FileInfo]:
    """Blocking: files under `folder` not modified for `max_age` seconds, oldest first."""
    cutoff = (time.time() if now is None else now) - max_age
    try:
        found = [f for f in _walk(folder) if f.mtime < cutoff]
    except FileNotFoundError:
        return []
    found.sort(key=lambda f: f.mtime)
    return found


def files_named(folder: Path, names: Iterable[str]) -> list[FileInfo]:
    """Blocking: the regular files among `folder`/name (missing ones are left out)."""
    found = []
    for name in names:
        path = folder / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            found.append(FileInfo(str(path), (st.st_dev, st.st_ino), st.st_size, st.st_mtime))
    return found


def list_top(folder: Path) -> list[FileInfo]:
    """Blocking: the regular files directly in `folder`."""
    try:
        with os.scandir(folder) as entries:
            return [i for i in (_info(e) for e in entries if not e.is_dir(follow_symlinks=False))
                    if i is not None]
    except OSError:
        return []


@dataclass
class Removed:
    files: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: "Removed") -> None:
        self.files += other.files
        self.bytes += other.bytes
        self.errors += other.errors


def remove(files: Iterable[FileInfo], folders: Iterable[Path] = ()) -> Removed:
    """Blocking: unlink `files`, then remove `folders` if they are empty. Bytes count as freed
    when a file's last link goes (a request's file and ComfyUI's original are one inode)."""
    removed = Removed()
    for info in files:
        try:
            st = os.lstat(info.path)
            os.unlink(info.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            removed.errors.append(f"{info.path}: {exc.strerror or exc}")
            continue
        removed.files += 1
        if st.st_nlink <= 1:
            removed.bytes += st.st_size
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty (a file we kept, or one written since): it stays
    return removed
