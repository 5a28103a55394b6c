"""The cache of models named by URL in requests: keyed by the URL, bounded, least recently used
out first, and never evicting a file that a queued or running request holds.

Layout, under `<state_dir>/models/cache/`: one folder per URL, named by the first 20 hex digits of
the URL's SHA-256, holding the file (under its name from the URL) and `meta.json` (the URL without
its query, and the links made to it). ComfyUI sees the file through a symbolic link in the models
folder, `<folder>/url-cache/<key>-<name>`: a stable name, the same for every request that names
the URL, which is what the request's input is rewritten to.

Requests for one URL at the same time share one download. A *lease* pins the entry until the
request ends; eviction (before a new file is written, to make room for its announced size) skips
pinned entries. The folder's mtime records the last use, so the order survives a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from api.modelstore.download import Downloader
from api.modelstore.errors import DownloadError
from api.modelstore.progress import human_bytes
from api.modelstore.sources import HttpSource, redact

logger = logging.getLogger(__name__)

LINK_FOLDER = "url-cache"
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def url_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:20]


def file_name(url: str) -> str:
    """The last path segment of the URL, made safe as a file name ('model' if there is none)."""
    name = unquote(PurePosixPath(urlsplit(url).path).name)
    cleaned = "".join(c if c in _SAFE else "_" for c in name).strip("._")
    return cleaned[:120] or "model"


@dataclass
class CacheEntry:
    key: str
    folder: Path
    name: str
    size: int = 0
    last_used: float = 0.0
    pins: int = 0
    links: set[str] = field(default_factory=set)

    @property
    def file(self) -> Path:
        return self.folder / self.name


@dataclass
class Lease:
    """A request's hold on one cached model; `name` is what its input now says."""

    entry: CacheEntry
    name: str
    seconds: float        # time this request waited for the file (0 when it was cached)
    downloaded: bool

    released: bool = False


class CacheFull(DownloadError):
    retryable = False


class UrlCache:
    def __init__(self, root: Path, models_dir: Path, downloader: Downloader, max_bytes: int,
                 parallel: int = 2):
        self.root = Path(root)
        self.models_dir = Path(models_dir)
        self.downloader = downloader
        self.max_bytes = max_bytes
        self.entries: dict[str, CacheEntry] = {}
        self.downloads = 0  # downloads started since the start (tests and metrics read it)
        self.evictions = 0
        self._inflight: dict[str, asyncio.Task] = {}
        self._loaded = False
        self._lock = asyncio.Lock()   # guards eviction against concurrent room-making
        self._slots = asyncio.Semaphore(parallel)  # downloads at once (models.parallel)
        self._reserved: dict[str, int] = {}        # key -> bytes a download under way will add

    # --- start ----------------------------------------------------------------------------------
    async def load(self) -> None:
        if not self._loaded:
            self.entries = await asyncio.to_thread(self._scan)
            self._loaded = True

    def _scan(self) -> dict[str, CacheEntry]:
        found: dict[str, CacheEntry] = {}
        if not self.root.is_dir():
            return found
        for folder in self.root.iterdir():
            try:
                meta = json.loads((folder / "meta.json").read_text())
                entry = CacheEntry(folder.name, folder, meta["name"],
                                   links=set(meta.get("links", [])))
                stat = entry.file.stat()
                entry.size, entry.last_used = stat.st_size, folder.stat().st_mtime
            except (OSError, ValueError, KeyError):
                continue  # an unfinished download: a new request starts it again
            found[entry.key] = entry
        return found

    @property
    def used_bytes(self) -> int:
        return sum(e.size for e in self.entries.values())

    # --- use ------------------------------------------------------------------------------------
    async def acquire(self, source: HttpSource, folder: str) -> Lease:
        """The model at `source.url`, linked into `folder`; downloads it unless cached."""
        await self.load()
        key = url_key(source.url)
        started = time.monotonic()
        downloaded = False
        entry = self.entries.get(key)
        if entry is None:
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.create_task(self._download(key, source), name=f"model-{key}")
                self._inflight[key] = task
                task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))
                downloaded = True
            entry = await asyncio.shield(task)
        entry.pins += 1
        try:
            name = await asyncio.to_thread(self._link, entry, folder, redact(source.url))
        except BaseException:
            entry.pins -= 1
            raise
        entry.last_used = time.time()
        await asyncio.to_thread(_touch, entry.folder)
        return Lease(entry, name, time.monotonic() - started, downloaded)

    def release(self, lease: Lease) -> None:
        if not lease.released:
            lease.released = True
            lease.entry.pins = max(0, lease.entry.pins - 1)

    async def _download(self, key: str, source: HttpSource) -> CacheEntry:
        self.downloads += 1
        folder = self.root / key
        name = file_name(source.url)
        entry = CacheEntry(key, folder, name)
        entry.pins += 1  # nobody may evict it while it is being written
        try:
            async with self._slots:
                fetched = await self.downloader.fetch(
                    source, folder / name,
                    before_write=lambda needed: self._make_room(needed, source.shown, key))
            entry.size = fetched.size
            await asyncio.to_thread(self._write_meta, entry, redact(source.url))
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, folder, True)
            raise
        finally:
            entry.pins -= 1
            self._reserved.pop(key, None)
        entry.last_used = time.time()
        self.entries[key] = entry
        logger.info("model cache: %s stored as %s (%s; cache %s of %s)", redact(source.url),
                    key, human_bytes(entry.size), human_bytes(self.used_bytes),
                    human_bytes(self.max_bytes))
        return entry

    # --- room -----------------------------------------------------------------------------------
    async def _make_room(self, needed: int | None, shown: str, key: str) -> None:
        """Evict least recently used, unpinned entries until `needed` more bytes fit (beside
        what other downloads under way have reserved)."""
        if needed is None:
            return  # size unknown: the cap is enforced by the next download's eviction
        if needed > self.max_bytes:
            raise CacheFull(shown, f"the file is {human_bytes(needed)}, more than the whole model "
                                f"cache ({human_bytes(self.max_bytes)}, models.cache_max_gb)")
        async with self._lock:
            self._reserved.pop(key, None)
            while self.used_bytes + sum(self._reserved.values()) + needed > self.max_bytes:
                victims = sorted((e for e in self.entries.values() if e.pins == 0),
                                 key=lambda e: e.last_used)
                if not victims:
                    raise CacheFull(shown, f"the model cache is full ({human_bytes(self.used_bytes)} "
                                        f"of {human_bytes(self.max_bytes)}, models.cache_max_gb) "
                                        "with files that queued or running requests use; try "
                                        "again later")
                await self.evict(victims[0])
            self._reserved[key] = needed

    async def evict(self, entry: CacheEntry) -> None:
        if entry.pins:
            raise RuntimeError(f"evicting {entry.key}, which is in use")
        self.entries.pop(entry.key, None)
        self.evictions += 1
        await asyncio.to_thread(self._remove, entry)
        logger.info("model cache: evicted %s (%s, unused for %.0f s)", entry.key,
                    human_bytes(entry.size), time.time() - entry.last_used)

    # --- files (worker threads) -----------------------------------------------------------------
    def _link(self, entry: CacheEntry, folder: str, shown: str) -> str:
        name = f"{LINK_FOLDER}/{entry.key}-{entry.name}"
        link = self.models_dir / folder / LINK_FOLDER / f"{entry.key}-{entry.name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not (link.is_symlink() and os.readlink(link) == str(entry.file)):
            # A name of its own: two requests may link the same file at the same moment.
            tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.link")
            tmp.symlink_to(entry.file)
            os.replace(tmp, link)
        if str(link) not in entry.links:
            entry.links.add(str(link))
            self._write_meta(entry, shown)
        return name

    @staticmethod
    def _write_meta(entry: CacheEntry, shown: str) -> None:
        meta = {"url": shown, "name": entry.name, "links": sorted(entry.links)}
        tmp = entry.folder / f"meta.json.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, entry.folder / "meta.json")

    @staticmethod
    def _remove(entry: CacheEntry) -> None:
        for link in entry.links:
            try:
                if Path(link).is_symlink():
                    Path(link).unlink()
            except OSError:
                pass
        shutil.rmtree(entry.folder, ignore_errors=True)


def _touch(folder: Path) -> None:
    try:
        os.utime(folder)
    except OSError:
        pass
