"""The host's model store: is each manifest file there and right, and if not, fetch it.

A file with the right SHA-256 is never fetched again; a file whose digest was checked before and
whose size and mtime have not changed is not hashed again (see `digests`). A present file that
the manifest gives no digest for is taken as it is ("present", not "verified"). A file with the
wrong digest is replaced — the verified download renames over it, so ComfyUI never sees a gap.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from api.comfy import folders as comfy_folders
from api.modelstore.digests import DigestRecord
from api.modelstore.download import Downloader, Fetched
from api.modelstore.manifest import ModelEntry
from api.modelstore.progress import FileProgress
from api.modelstore.sources import resolve

logger = logging.getLogger(__name__)


class EntryState(str, enum.Enum):
    VERIFIED = "verified"    # present, SHA-256 matches the manifest
    PRESENT = "present"      # present; the manifest has no digest to check it against
    MISMATCH = "mismatch"    # present with another digest: will be downloaded again
    MISSING = "missing"


@dataclass(frozen=True)
class EntryStatus:
    entry: ModelEntry
    state: EntryState
    path: Path
    size: int | None = None
    sha256: str | None = None
    fetched: Fetched | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.entry.path, "url": self.entry.url.split("?")[0],
                "when": self.entry.when.value, "state": self.state.value, "size": self.size,
                "sha256": self.sha256, "file": str(self.path)}


def models_state_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "models"


class ModelStore:
    def __init__(self, models_dir: Path, state_dir: Path, downloader: Downloader, *,
                 environ: Mapping[str, str], s3_defaults: Any = None, parallel: int = 2):
        self.models_dir = Path(models_dir)
        self.digests = DigestRecord(models_state_dir(state_dir) / "verified.json")
        self.downloader = downloader
        self.environ = environ
        self.s3_defaults = s3_defaults
        self._slots = asyncio.Semaphore(parallel)
        self._locks: dict[str, asyncio.Lock] = {}

    def destination(self, entry: ModelEntry) -> Path:
        return entry.destination(self.models_dir)

    async def inspect(self, entry: ModelEntry) -> EntryStatus:
        """What is on disk for `entry` (hashes it, off the loop, unless its digest is known)."""
        return await asyncio.to_thread(self._inspect, entry)

    def _inspect(self, entry: ModelEntry) -> EntryStatus:
        path = self.destination(entry)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return EntryStatus(entry, EntryState.MISSING, path)
        if not path.is_file():
            return EntryStatus(entry, EntryState.MISSING, path)
        if entry.sha256 is None:
            return EntryStatus(entry, EntryState.PRESENT, path, size, self.digests.known(path))
        actual = self.digests.digest(path)
        state = EntryState.VERIFIED if actual == entry.sha256 else EntryState.MISMATCH
        return EntryStatus(entry, state, path, size, actual)

    async def ensure(self, entry: ModelEntry, progress: FileProgress | None = None) -> EntryStatus:
        """Make `entry` present and right; raises DownloadError or ManifestError."""
        path = self.destination(entry)
        lock = self._locks.setdefault(str(path), asyncio.Lock())
        async with lock:
            status = await self.inspect(entry)
            if status.state in (EntryState.VERIFIED, EntryState.PRESENT):
                logger.debug("%s is %s", entry.path, status.state.value)
                return status
            if status.state is EntryState.MISMATCH:
                logger.warning("%s has SHA-256 %s, the manifest says %s: downloading it again",
                               path, status.sha256, entry.sha256)
            source = resolve(entry, self.environ, self.s3_defaults)
            async with self._slots:
                fetched = await self.downloader.fetch(source, path, sha256=entry.sha256,
                                                      progress=progress)
            await asyncio.to_thread(self.digests.remember, path, fetched.sha256)
            state = EntryState.VERIFIED if entry.sha256 else EntryState.PRESENT
            return EntryStatus(entry, state, path, fetched.size, fetched.sha256, fetched)


def build_store(settings: Any, environ: Mapping[str, str], *,
                downloader: Downloader | None = None) -> ModelStore:
    """The store as the settings describe it (shared by the daemon and the CLI)."""
    m = settings.models
    downloader = downloader or Downloader(retries=m.retries, backoff_initial=m.backoff_initial,
                                          backoff_max=min(m.backoff_max, 60.0),
                                          read_timeout=m.read_timeout)
    return ModelStore(comfy_folders.from_settings(settings).models.path, settings.worker.state_dir, downloader,
                      environ=environ, s3_defaults=settings.s3, parallel=m.parallel)
