"""The newest ComfyUI's asset catalog: a small SQLite database of the files it knows.

Like ComfyUI it records every output file a prompt wrote (and every ``/upload/image``), walks
the output folder after prompts (at its 10 s garbage-collection tick) and records every file it
finds there, scans the models and input folders at start and on ``/object_info``. A file that
is gone is *not* deleted from the catalog: its row is marked missing and stays, as ComfyUI's
rows do until deleted through its assets API; so the table grows by one row per file ever
written. Temp rows are deleted (and the temp folder removed) at start and at shutdown.

The schema is the simulator's own; only the behaviour follows ComfyUI. All database and disk
work runs on one worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import enum
import hashlib
import logging
import mimetypes
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar

from simulator.paths import Directories

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Stand-in for ComfyUI's blake3 digests: the same "blake3:<64 hex>" shape, made with the
# standard library's BLAKE2b (the simulator needs no blake3 package).
HASH_PREFIX = "blake3:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS assets (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    name TEXT NOT NULL,
    root TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash TEXT,
    mime_type TEXT,
    job_id TEXT,
    is_missing INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS assets_by_path ON assets (path, is_missing);
CREATE INDEX IF NOT EXISTS assets_by_hash ON assets (hash);
"""


class AssetRoot(str, enum.Enum):
    INPUT = "input"
    OUTPUT = "output"
    TEMP = "temp"
    MODELS = "models"


@dataclass(frozen=True)
class AssetCounts:
    rows: int
    missing: int
    walks: int  # walks of the output folder so far
    last_walk_files: int  # files found in the output folder by the latest one

    def to_json(self) -> dict[str, int]:
        return {"rows": self.rows, "missing": self.missing, "walks": self.walks,
                "last_walk_files": self.last_walk_files}


@dataclass(frozen=True)
class ResolvedAsset:
    path: str
    name: str
    mime_type: str | None


class Assets(Protocol):
    """What the server and the executor need from the assets system."""

    @property
    def enabled(self) -> bool: ...

    async def enrich_outputs(self, ui: dict[str, Any], job_id: str) -> dict[str, Any]:
        """The node's UI output with ``id`` (and ``preview_id``) on each registered file."""

    async def register_upload(self, abs_path: str, name: str, upload_type: str) -> dict[str, Any] | None:
        """The ``asset`` block of an ``/upload/image`` answer, or None."""

    async def walk(self, roots: tuple[AssetRoot, ...]) -> None:
        """Bring the catalog in line with these folders."""

    async def resolve_hash(self, asset_hash: str) -> ResolvedAsset | None: ...

    async def counts(self) -> AssetCounts: ...


class NoAssets:
    """Assets off (0.3.64, or ``--disable-assets``): outputs carry no ids, nothing is recorded."""

    @property
    def enabled(self) -> bool:
        return False

    async def enrich_outputs(self, ui: dict[str, Any], job_id: str) -> dict[str, Any]:
        return ui

    async def register_upload(self, abs_path: str, name: str, upload_type: str) -> dict[str, Any] | None:
        return None

    async def walk(self, roots: tuple[AssetRoot, ...]) -> None:
        return None

    async def resolve_hash(self, asset_hash: str) -> ResolvedAsset | None:
        return None

    async def counts(self) -> AssetCounts:
        return AssetCounts(0, 0, 0, 0)


def content_hash(path: str) -> str:
    """Blocking: reads the whole file."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return HASH_PREFIX + digest.hexdigest()


class AssetCatalog:
    """The catalog over a SQLite file (or memory). Open it with ``open`` at start-up (blocking,
    before the event loop), use the async methods while serving, ``close`` at shutdown."""

    def __init__(self, db_path: str | None, dirs: Directories, hash_outputs: bool = False) -> None:
        self._db_path = db_path
        self._dirs = dirs
        self._hash_outputs = hash_outputs
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="assets")
        self._conn: sqlite3.Connection | None = None
        self._walks = 0
        self._last_walk_files = 0

    @property
    def enabled(self) -> bool:
        return True

    # --- lifecycle (blocking; start-up and shutdown run outside the event loop) -----------

    def open(self) -> None:
        """Create the tables, drop temp rows (the temp folder is emptied at start too)."""
        conn = sqlite3.connect(self._db_path or ":memory:", check_same_thread=False)
        if self._db_path is not None:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
        self._conn = conn
        self._wipe_temp_rows()

    def close(self) -> None:
        """Shutdown: temp rows deleted, temp folder removed, database closed."""
        self._pool.shutdown(wait=True)
        if self._conn is not None:
            try:
                self._wipe_temp_rows()
            finally:
                self._conn.close()
                self._conn = None

    # --- async API ---------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def enrich_outputs(self, ui: dict[str, Any], job_id: str) -> dict[str, Any]:
        return await self._run(self._enrich, ui, job_id)

    async def register_upload(self, abs_path: str, name: str, upload_type: str) -> dict[str, Any] | None:
        return await self._run(self._register_upload, abs_path, name, upload_type)

    async def walk(self, roots: tuple[AssetRoot, ...]) -> None:
        await self._run(self._walk_roots, roots)

    async def resolve_hash(self, asset_hash: str) -> ResolvedAsset | None:
        return await self._run(self._resolve_hash, asset_hash)

    async def counts(self) -> AssetCounts:
        return await self._run(self._counts)

    # --- worker-thread side --------------------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the asset catalog is not open: call open() first")
        return self._conn

    def _root_dir(self, root: AssetRoot) -> str:
        return {AssetRoot.INPUT: self._dirs.input, AssetRoot.OUTPUT: self._dirs.output,
                AssetRoot.TEMP: self._dirs.temp, AssetRoot.MODELS: self._dirs.checkpoints}[root]

    def _register(self, abs_path: str, root: AssetRoot, job_id: str | None, digest: str | None) -> str:
        """The id of the live row for this file, made (or split off a changed file) as needed."""
        stat = os.stat(abs_path)
        db = self._db
        live = db.execute("SELECT id, size_bytes, mtime_ns FROM assets WHERE path = ? AND is_missing = 0",
                          (abs_path,)).fetchone()
        if live is not None:
            row_id, size, mtime = live
            if (size, mtime) == (stat.st_size, stat.st_mtime_ns):
                if digest is not None:
                    db.execute("UPDATE assets SET hash = ? WHERE id = ?", (digest, row_id))
                db.commit()
                return row_id
            if size == stat.st_size:  # touched, not changed: refresh the facts
                db.execute("UPDATE assets SET mtime_ns = ?, hash = ? WHERE id = ?",
                           (stat.st_mtime_ns, digest, row_id))
                db.commit()
                return row_id
            # New bytes at the same path: the old row goes missing, the file gets a new one.
            db.execute("UPDATE assets SET is_missing = 1 WHERE id = ?", (row_id,))
        row_id = str(uuid.uuid4())
        db.execute("INSERT INTO assets (id, path, name, root, size_bytes, mtime_ns, hash, mime_type, job_id, "
                   "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (row_id, abs_path, os.path.basename(abs_path), root.value, stat.st_size, stat.st_mtime_ns,
                    digest, mimetypes.guess_type(abs_path)[0], job_id, time.time()))
        db.commit()
        return row_id

    def _enrich(self, ui: dict[str, Any], job_id: str) -> dict[str, Any]:
        enriched = copy.deepcopy(ui)
        for entries in enriched.values():
            if not isinstance(entries, list):
                continue
            for entry in entries:
                if not isinstance(entry, dict) or "filename" not in entry or "type" not in entry:
                    continue
                entry.pop("id", None)
                entry.pop("preview_id", None)
                try:
                    root = AssetRoot(entry["type"])
                    base = self._root_dir(root)
                    path = os.path.abspath(os.path.join(base, entry.get("subfolder") or "", entry["filename"]))
                    if os.path.commonpath((base, path)) != base or not os.path.isfile(path):
                        continue
                    digest = content_hash(path) if self._hash_outputs else None
                    entry["id"] = self._register(path, root, job_id, digest)
                    if (mimetypes.guess_type(path)[0] or "").startswith("image/"):
                        entry["preview_id"] = entry["id"]  # an image is its own preview
                except (ValueError, OSError, sqlite3.Error):
                    logger.warning("Asset registration failed for output: %s", entry.get("filename"), exc_info=True)
        return enriched

    def _register_upload(self, abs_path: str, name: str, upload_type: str) -> dict[str, Any] | None:
        try:
            digest = content_hash(abs_path)  # uploads are hashed whatever --enable-asset-hashing says
            tag = upload_type if upload_type in ("input", "output") else "input"
            row_id = self._register(abs_path, AssetRoot(upload_type), None, digest)
            size = os.path.getsize(abs_path)
        except (ValueError, OSError, sqlite3.Error):
            logger.warning("Failed to register uploaded image as asset", exc_info=True)
            return None
        return {"id": row_id, "name": name, "asset_hash": digest, "size": size,
                "mime_type": mimetypes.guess_type(abs_path)[0], "tags": [tag]}

    def _walk_roots(self, roots: tuple[AssetRoot, ...]) -> None:
        for root in roots:
            found = self._walk(root)
            if root is AssetRoot.OUTPUT:
                self._walks += 1
                self._last_walk_files = found

    def _walk(self, root: AssetRoot) -> int:
        """Rows whose file is gone are marked missing (never deleted); files without a live row
        are added. Returns the number of files found."""
        base = self._root_dir(root)
        db = self._db
        prefix = base.rstrip(os.sep) + os.sep
        live = db.execute("SELECT id, path FROM assets WHERE is_missing = 0 AND substr(path, 1, ?) = ?",
                          (len(prefix), prefix)).fetchall()
        known = set()
        for row_id, path in live:
            if os.path.isfile(path):
                known.add(path)
            else:
                db.execute("UPDATE assets SET is_missing = 1 WHERE id = ?", (row_id,))
        db.commit()
        found = 0
        for folder, subfolders, files in os.walk(base, followlinks=True):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            for name in files:
                if name.startswith("."):
                    continue
                path = os.path.join(folder, name)
                found += 1
                if path in known:
                    continue
                try:
                    if os.path.getsize(path) == 0:  # ComfyUI's scan admits no empty files
                        continue
                    digest = content_hash(path) if self._hash_outputs else None
                    self._register(path, root, None, digest)
                except OSError:
                    continue
        return found

    def _resolve_hash(self, asset_hash: str) -> ResolvedAsset | None:
        row = self._db.execute("SELECT path, name, mime_type FROM assets WHERE hash = ? AND is_missing = 0 "
                               "ORDER BY created_at DESC LIMIT 1", (asset_hash,)).fetchone()
        if row is None or not os.path.isfile(row[0]):
            return None
        return ResolvedAsset(*row)

    def _counts(self) -> AssetCounts:
        rows, missing = self._db.execute("SELECT COUNT(*), COALESCE(SUM(is_missing), 0) FROM assets").fetchone()
        return AssetCounts(rows, missing, self._walks, self._last_walk_files)

    def _wipe_temp_rows(self) -> None:
        prefix = self._dirs.temp.rstrip(os.sep) + os.sep
        self._db.execute("DELETE FROM assets WHERE substr(path, 1, ?) = ?", (len(prefix), prefix))
        self._db.commit()


def remove_temp_folder(dirs: Directories) -> None:
    """The newest ComfyUI removes its temp folder at shutdown too (0.3.64 only at start)."""
    if os.path.exists(dirs.temp):
        try:
            shutil.rmtree(dirs.temp)
        except OSError as ex:
            logger.warning("Failed to remove temp directory %s: %s", dirs.temp, ex)
