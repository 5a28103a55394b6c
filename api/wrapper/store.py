"""Finished results, kept for a while and persisted so that a wrapper restart loses none.

One JSON file per request under ``<state_dir>/results/``. A request that was still running when the
wrapper stopped is recorded as failed ("the wrapper restarted") on the next start, so a client
polling `/result/{id}` learns what happened instead of getting a 404.

Memory stays flat however many results are kept: the index (id → time written) holds every
result, but only the most recent `memory_items` bodies stay in memory; older ones are read back
from their file when asked for. Expiry runs at most once a minute (or when over the count), not
on every write, so a save costs the same with ten results kept or ten thousand.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_TERMINAL = {"completed", "failed", "cancelled", "timeout"}
EXPIRE_EVERY = 60.0


class ResultStore:
    def __init__(self, folder: Path | None, ttl: float, max_items: int,
                 memory_items: int = 256):
        self.folder = folder
        self.ttl = ttl
        self.max_items = max_items
        self.memory_items = memory_items
        self._stamps: OrderedDict[str, float] = OrderedDict()   # every result, oldest first
        self._bodies: OrderedDict[str, dict[str, Any]] = OrderedDict()  # the recent ones
        self._last_expire = 0.0
        self._expired: list[Path] = []  # files of forgotten results, deleted off the loop

    def load(self) -> int:
        """Blocking: read what an earlier run left; returns how many results were recovered."""
        if self.folder is None:
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for path in self.folder.glob("*.json"):
            try:
                entries.append((path.stat().st_mtime, path))
            except OSError:
                continue
        entries.sort()
        for stamp, path in entries:
            request_id = path.stem
            self._stamps[request_id] = stamp
        # Requests that were still running when the wrapper stopped are the newest ones.
        for _, path in entries[-self.memory_items:]:
            record = self._read(path.stem)
            if record is None:
                self._stamps.pop(path.stem, None)
                continue
            if _mark_interrupted(record):
                self._write(record)
                self._stamps[record["id"]] = time.time()
                self._stamps.move_to_end(record["id"])
            self._keep_body(record)
        self.expire(force=True)
        expired, self._expired = self._expired, []
        for old in expired:
            self._unlink(old)
        return len(self._stamps)

    async def save(self, record: dict[str, Any]) -> None:
        """Remember a result and write its file off the event loop."""
        self.remember(record)
        await self.write(record)

    async def write(self, record: dict[str, Any]) -> None:
        """Write a remembered result's file, and delete expired ones, off the event loop."""
        expired, self._expired = self._expired, []
        await asyncio.to_thread(self._write, record, expired)

    async def get(self, request_id: str) -> dict[str, Any] | None:
        stamp = self._stamps.get(request_id)
        if stamp is None:
            return None
        if time.time() - stamp > self.ttl:
            self._drop(request_id)
            return None
        body = self._bodies.get(request_id)
        if body is None:
            body = await asyncio.to_thread(self._read, request_id)
            if body is not None and _mark_interrupted(body):
                await asyncio.to_thread(self._write, body)
        return body

    def knows(self, request_id: str) -> bool:
        """A result of this id was recorded and not forgotten yet (expired or not)."""
        return request_id in self._stamps

    def readable(self, request_id: str) -> bool:
        """GET /result/{id} would find it now."""
        stamp = self._stamps.get(request_id)
        return stamp is not None and time.time() - stamp <= self.ttl

    def expire(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_expire < EXPIRE_EVERY and \
                len(self._stamps) <= self.max_items:
            return
        self._last_expire = now
        cutoff = now - self.ttl
        while self._stamps:
            oldest, stamp = next(iter(self._stamps.items()))
            if stamp >= cutoff and len(self._stamps) <= self.max_items:
                break
            self._drop(oldest)

    def __len__(self) -> int:
        return len(self._stamps)

    def remember(self, record: dict[str, Any]) -> None:
        """Make a result readable now (its file is written separately)."""
        self._stamps[record["id"]] = time.time()
        self._stamps.move_to_end(record["id"])
        self._keep_body(record)
        self.expire()

    def _keep_body(self, record: dict[str, Any]) -> None:
        self._bodies[record["id"]] = record
        self._bodies.move_to_end(record["id"])
        while len(self._bodies) > self.memory_items:
            self._bodies.popitem(last=False)

    def _path(self, request_id: str) -> Path | None:
        return self.folder / f"{request_id}.json" if self.folder else None

    def _read(self, request_id: str) -> dict[str, Any] | None:
        path = self._path(request_id)
        if path is None:
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("unreadable result file %s: %s", path, exc)
            return None

    def _write(self, record: dict[str, Any], expired: list[Path] = ()) -> None:
        for old in expired:
            self._unlink(old)
        path = self._path(record["id"])
        if path is None:
            return
        tmp = path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            logger.error("could not persist result %s: %s", record["id"], exc)

    def _drop(self, request_id: str) -> None:
        """Forget a result now; its file goes with the next write (which runs in a thread)."""
        self._stamps.pop(request_id, None)
        self._bodies.pop(request_id, None)
        path = self._path(request_id)
        if path is not None:
            self._expired.append(path)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not delete expired result %s: %s", path, exc)


def _mark_interrupted(record: dict[str, Any]) -> bool:
    """A stored result still marked as running belongs to an earlier run of the wrapper."""
    if record.get("status") in _TERMINAL:
        return False
    record.update(status="failed", failure="restarted", _http_status=502,
                  message="The wrapper restarted before this request finished; "
                          "its outputs, if any, are still on disk.")
    return True
