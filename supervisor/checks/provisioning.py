"""The daemon's side of the model manifest: fetch the files, and say where it stands.

`before_ready` files come first: until every one is present (and verified, where the manifest
gives a digest) the worker is `provisioning` and neither benchmarks nor takes work. Then the
`background` files are fetched while the worker serves. A file whose download fails (after the
engine's own retries) is tried again later with a growing delay, for as long as the daemon runs:
the source may get the file, the network may come back. Meanwhile a failing `before_ready` file
makes the worker `unhealthy`, with the URL, the error and the time of the next try.

Each file has a lifecycle (`ItemState`); every change is logged as ``old -> new (reason)``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from api.modelstore import DownloadError, FileProgress, ManifestError, ModelEntry, When
from api.modelstore.progress import human_bytes
from api.modelstore.store import EntryStatus, ModelStore
from supervisor.state import OK, Level, Verdict

logger = logging.getLogger(__name__)


class ItemState(str, enum.Enum):
    WAITING = "waiting"          # not looked at yet
    CHECKING = "checking"        # on disk? right digest? (hashing, off the loop)
    DOWNLOADING = "downloading"
    RETRY_WAIT = "retry_wait"    # failed; the next try is scheduled
    DONE = "done"


@dataclass
class Item:
    entry: ModelEntry
    state: ItemState = ItemState.WAITING
    progress: FileProgress | None = None
    failures: int = 0
    error: str = ""
    status: int | None = None       # the HTTP status of the last failure, when there was one
    next_try_at: float | None = None
    result: EntryStatus | None = None

    def describe_failure(self) -> str:
        """Stable between tries (no countdown): the autoscaler is told when the text changes."""
        when = time.strftime("%H:%M:%S UTC", time.gmtime(self.next_try_at or time.time()))
        return (f"model {self.entry.path} failed {self.failures} time(s): {self.error}; "
                f"next try at {when}")

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"path": self.entry.path, "when": self.entry.when.value,
                                "state": self.state.value, "failures": self.failures}
        if self.progress is not None:
            body["progress"] = self.progress.to_dict()
        if self.error:
            body.update(error=self.error, http_status=self.status, next_try_at=self.next_try_at)
        if self.result is not None:
            body.update(verified=self.result.state.value, size=self.result.size,
                        sha256=self.result.sha256)
        return body


@dataclass
class Totals:
    done_bytes: int = 0
    total_bytes: int = 0
    failures: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class Provisioner:
    def __init__(self, store: ModelStore, entries: list[ModelEntry], *,
                 backoff_initial: float, backoff_max: float,
                 on_change: Callable[[], None] = lambda: None, folder_note: str = ""):
        self.store = store
        #: Said with every reason when the models folder is only a guess (see wiring.py):
        #: provisioning runs before ComfyUI is up, so nothing can be asked of it yet.
        self.folder_note = folder_note
        self.items = [Item(e) for e in entries]
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.on_change = on_change
        self.failures_total = 0
        self._before = [i for i in self.items if i.entry.when is When.BEFORE_READY]
        self._background = [i for i in self.items if i.entry.when is When.BACKGROUND]
        self.started = False

    # --- what the daemon asks -------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Every before_ready file is in place: the benchmark may run, work may be taken."""
        return all(i.state is ItemState.DONE for i in self._before)

    def verdict(self) -> Verdict:
        failing = [i.describe_failure() for i in self._before if i.state is ItemState.RETRY_WAIT]
        if failing and self.folder_note:
            failing.append(self.folder_note)
        return Verdict(Level.UNHEALTHY, tuple(failing)) if failing else OK

    def reason(self) -> str:
        """While before_ready files are missing: what is happening, in one line; else ''."""
        if self.ready:
            return ""
        text = self._progress()
        return f"{text} ({self.folder_note})" if self.folder_note else text

    def _progress(self) -> str:
        total = len(self._before)
        done = sum(1 for i in self._before if i.state is ItemState.DONE)
        # A download waiting for a slot (models.parallel) has no bytes yet: not "downloading".
        active = [i for i in self._before if i.state is ItemState.DOWNLOADING and i.progress
                  and (i.progress.done or i.progress.total)]
        if active:
            first = done + 1
            span = f"{first}" if len(active) == 1 else f"{first}-{done + len(active)}"
            return (f"downloading {span} of {total} models: "
                    + "; ".join(i.progress.describe() for i in active))
        checking = [i.entry.name for i in self._before if i.state is ItemState.CHECKING]
        if checking:
            return f"checking {len(checking)} of {total} models on disk: {', '.join(checking)}"
        return f"waiting for {total - done} of {total} models"

    def totals(self) -> Totals:
        totals = Totals(failures=self.failures_total)
        for item in self.items:
            if item.progress is not None:
                totals.done_bytes += item.progress.done
                totals.total_bytes += item.progress.total or item.progress.done
            elif item.result is not None and item.result.size:
                totals.done_bytes += item.result.size
                totals.total_bytes += item.result.size
        return totals

    def missing(self) -> int:
        return sum(1 for i in self.items if i.state is not ItemState.DONE)

    def snapshot(self) -> dict[str, Any]:
        totals = self.totals()
        state = "ready" if self.ready else ("failing" if self.verdict().level is Level.UNHEALTHY
                                            else "provisioning")
        if self.ready and any(i.state is not ItemState.DONE for i in self._background):
            state = "background"
        return {"status": state, "reason": self.reason() or self.verdict().reason,
                "done_bytes": totals.done_bytes, "total_bytes": totals.total_bytes,
                "failures": totals.failures, "files": [i.to_dict() for i in self.items]}

    # --- running --------------------------------------------------------------------------------
    async def close(self) -> None:
        """Close the store's downloads (the daemon stops)."""
        await self.store.downloader.close()

    async def run(self) -> None:
        self.started = True
        if self._before:
            logger.info("models: %d to have before ready, %d in the background",
                        len(self._before), len(self._background))
        await asyncio.gather(*(self._provide(i) for i in self._before))
        if self._before:
            logger.info("models: every before_ready file is in place")
        self.on_change()
        await asyncio.gather(*(self._provide(i) for i in self._background))

    def _move(self, item: Item, state: ItemState, reason: str) -> None:
        if item.state is not state:
            logger.info("model %s: %s -> %s (%s)", item.entry.path, item.state.value,
                        state.value, reason)
        item.state = state
        self.on_change()

    async def _provide(self, item: Item) -> None:
        delay = self.backoff_initial
        while True:
            self._move(item, ItemState.CHECKING, "looking at the file on disk")
            progress = FileProgress(item.entry.name)
            try:
                status = await self.store.inspect(item.entry)
                if status.state.value not in ("verified", "present"):
                    item.progress = progress
                    self._move(item, ItemState.DOWNLOADING, f"{status.state.value} on disk")
                    status = await self.store.ensure(item.entry, progress)
            except (DownloadError, ManifestError) as exc:
                self.failures_total += 1
                item.failures += 1
                item.error = str(exc)
                item.status = getattr(exc, "status", None)
                item.next_try_at = time.time() + delay
                self._move(item, ItemState.RETRY_WAIT, f"{exc}; next try in {delay:.0f} s")
                await asyncio.sleep(delay)
                delay = min(self.backoff_max, delay * 2)
                continue
            item.result = status
            item.error, item.next_try_at = "", None
            item.progress = None
            what = status.state.value
            size = human_bytes(status.size or 0)
            self._move(item, ItemState.DONE, f"{what}, {size}")
            return
