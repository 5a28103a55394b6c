"""Verified digests, remembered by file size and modification time.

Hashing a 20 GB checkpoint takes a minute; a restart should not pay it again. After a file is
hashed (downloaded, or found on disk) its SHA-256 is stored with its size and mtime; while both
are unchanged the file is taken as verified. Any write to the file changes its mtime, so an
edited or truncated file is hashed again. Calls do file work: run them off the event loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

HASH_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(HASH_CHUNK)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


class DigestRecord:
    """`<state_dir>/models/verified.json`: absolute path -> size, mtime_ns, sha256."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._data is None:
            try:
                self._data = json.loads(self.path.read_text())
                if not isinstance(self._data, dict):
                    self._data = {}
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def known(self, file: Path) -> str | None:
        """The remembered digest of `file` if it has not changed since; else None."""
        try:
            stat = file.stat()
        except OSError:
            return None
        with self._lock:
            entry = self._load().get(str(file.resolve()))
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return entry.get("sha256")
        return None

    def remember(self, file: Path, sha256: str) -> None:
        stat = file.stat()
        with self._lock:
            data = self._load()
            data[str(file.resolve())] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                         "sha256": sha256}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)

    def digest(self, file: Path) -> str:
        """The file's SHA-256: remembered if unchanged, else computed and remembered."""
        known = self.known(file)
        if known:
            return known
        value = sha256_file(file)
        self.remember(file, value)
        return value
