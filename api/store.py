"""Finished results, kept for a while and persisted so that a wrapper restart loses none.

One JSON file per request under ``<state_dir>/results/``. A request that was still running when the
wrapper stopped is recorded as failed ("the wrapper restarted") on the next start, so a client
polling `/result/{id}` learns what happened instead of getting a 404.
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


class ResultStore:
    def __init__(self, folder: Path | None, ttl: float, max_items: int):
        self.folder = folder
        self.ttl = ttl
        self.max_items = max_items
        self._records: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def load(self) -> int:
        """Read what an earlier run left; returns how many results were recovered."""
        if self.folder is None:
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for path in self.folder.glob("*.json"):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                stamp = path.stat().st_mtime
            except (OSError, json.JSONDecodeError) as exc:
                logger.warning("unreadable result file %s skipped: %s", path, exc)
                continue
            entries.append((stamp, record, path))
        entries.sort(key=lambda e: e[0])
        for stamp, record, path in entries:
            if record.get("status") not in _TERMINAL:
                record.update(status="failed", failure="restarted", _http_status=502,
                              message="The wrapper restarted before this request finished; "
                                      "its outputs, if any, are still on disk.")
                self._write(record)
                stamp = time.time()
            self._records[record["id"]] = (stamp, record)
        self.expire()
        return len(self._records)

    def put(self, record: dict[str, Any]) -> None:
        self._remember(record)
        self._write(record)

    async def save(self, record: dict[str, Any]) -> None:
        """Like put, with the file written off the event loop."""
        self._remember(record)
        await asyncio.to_thread(self._write, record)

    def _remember(self, record: dict[str, Any]) -> None:
        self._records[record["id"]] = (time.time(), record)
        self._records.move_to_end(record["id"])
        self.expire()

    def get(self, request_id: str) -> dict[str, Any] | None:
        entry = self._records.get(request_id)
        if entry is None:
            return None
        if time.time() - entry[0] > self.ttl:
            self._drop(request_id)
            return None
        return entry[1]

    def expire(self) -> None:
        cutoff = time.time() - self.ttl
        for request_id, (stamp, _) in list(self._records.items()):
            if stamp < cutoff:
                self._drop(request_id)
        while len(self._records) > self.max_items:
            oldest = next(iter(self._records))
            self._drop(oldest)

    def __len__(self) -> int:
        return len(self._records)

    def _path(self, request_id: str) -> Path | None:
        return self.folder / f"{request_id}.json" if self.folder else None

    def _write(self, record: dict[str, Any]) -> None:
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
        self._records.pop(request_id, None)
        path = self._path(request_id)
        if path is not None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("could not delete expired result %s: %s", path, exc)
