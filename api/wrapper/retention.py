"""Retention: the files requests leave on disk go once no request needs them.

Three kinds, each with its rule (`RetentionPolicy`, from the ``retention.*`` settings):

* **outputs** — a finished request's folder ``<output>/<request_id>/`` and the ComfyUI files it
  links to, once its result is no longer readable (``expired``), or as soon as every file is in
  S3 (``uploaded``); over the size cap, the oldest finished requests go first; when the disk
  guard asks for space, finished requests older than ``pressure_min_age`` go too;
* **inputs** — the images uploaded into ComfyUI's input folder for a request, once it finished;
* **temp** — files in ComfyUI's temp folder older than ``temp_max_age``.

What is never deleted: a file of a request that is still *needed* — queued, running, collecting
or uploading its outputs (the job is still active), or whose webhook has not settled (the spool
holds it) — and any file that is no request's (the operator's own inputs, ComfyUI's files that no
request links to, folders of requests this wrapper does not know).

A pass walks the output folder off the event loop, decides on the loop, and deletes in steps
of ``batch_files`` files, each in a thread and under `FileGuard.deleting`: while a step runs, no
request's files are being written (the input upload and the output collection hold
`FileGuard.writing`), and just before each step the needed requests are asked again, so a
request that became active since the walk keeps its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from api.host.disk import format_bytes
from api.wrapper.files_on_disk import (
    FileInfo,
    FolderCache,
    OutputInventory,
    Removed,
    list_top,
    old_files,
    remove,
    scan_outputs,
)

logger = logging.getLogger(__name__)

OutputRule = Literal["expired", "uploaded", "keep"]
InputRule = Literal["finished", "keep"]
KINDS = ("outputs", "inputs", "temp")
_GB = 1_000_000_000
#: The names the wrapper gives the images it uploads for a request: <request id>_<n>.<ext>.
_INPUT_NAME = re.compile(r"^(?P<id>.+)_\d+\.(?:png|jpg|gif|bmp|webp)$")


@dataclass(frozen=True)
class RetentionPolicy:
    enabled: bool = True
    outputs: OutputRule = "expired"
    outputs_max_bytes: int = 10 * _GB       # 0: no cap
    inputs: InputRule = "finished"
    temp_max_age: float = 3600.0            # 0: keep
    interval: float = 60.0
    batch_files: int = 500
    pressure_min_age: float = 60.0

    @classmethod
    def from_settings(cls, settings: Any) -> "RetentionPolicy":
        r = settings.retention
        return cls(enabled=r.enabled, outputs=r.outputs,
                   outputs_max_bytes=int(r.outputs_max_gb * _GB), inputs=r.inputs,
                   temp_max_age=r.temp_max_age, interval=r.interval, batch_files=r.batch_files,
                   pressure_min_age=r.pressure_min_age)

    @property
    def deletes_outputs(self) -> bool:
        return self.enabled and self.outputs != "keep"

    def off_reason(self) -> str:
        if not self.enabled:
            return "retention is off (retention.enabled = false)"
        return "outputs are kept (retention.outputs = keep)"


class Lifecycle(Protocol):
    """What retention asks of the requests' lifecycle (`JobLifecycle` in the wrapper)."""

    def needed(self) -> set[str]:
        """Request ids whose files must stay: active (queued, running, delivering outputs) or
        with a webhook not settled yet."""

    def known(self, request_id: str) -> bool:
        """A request this wrapper served (the result store has a record of it)."""

    def readable(self, request_id: str) -> bool:
        """Its result can still be read at /result/{id}."""


class _Jobs(Protocol):
    def __contains__(self, request_id: object) -> bool: ...

    def __iter__(self): ...


class _Store(Protocol):
    def knows(self, request_id: str) -> bool: ...

    def readable(self, request_id: str) -> bool: ...


class _Webhooks(Protocol):
    def pending_requests(self) -> set[str]: ...


class JobLifecycle:
    """The wrapper's answer: its active jobs, the webhook spool, the result store."""

    def __init__(self, active: _Jobs, store: _Store, webhooks: _Webhooks | None = None):
        self._active = active
        self._store = store
        self._webhooks = webhooks

    def needed(self) -> set[str]:
        ids = set(self._active)
        if self._webhooks is not None:
            ids |= self._webhooks.pending_requests()
        return ids

    def known(self, request_id: str) -> bool:
        return self._store.knows(request_id)

    def readable(self, request_id: str) -> bool:
        return self._store.readable(request_id)


class FileGuard:
    """Writers of request files share; a deletion step excludes them (and waits for them).

    A waiting deletion holds new writers back, so steady traffic cannot starve it; a step is
    short (one batch of unlinks). One deletion at a time (retention runs one pass at a time).
    A writer that finds no deletion under way enters without waiting: the request path pays
    nothing for it."""

    def __init__(self) -> None:
        self._writers = 0
        self._open = asyncio.Event()   # writers may enter
        self._open.set()
        self._idle = asyncio.Event()   # no writer inside
        self._idle.set()

    def writing(self) -> "_Writing":
        return _Writing(self)

    @contextlib.asynccontextmanager
    async def deleting(self) -> AsyncIterator[None]:
        self._open.clear()
        try:
            await self._idle.wait()
            yield
        finally:
            self._open.set()

    async def _enter(self) -> None:
        while not self._open.is_set():
            await self._open.wait()
        self._writers += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._writers -= 1
        if not self._writers:
            self._idle.set()


class _Writing:
    __slots__ = ("_guard",)

    def __init__(self, guard: FileGuard):
        self._guard = guard

    async def __aenter__(self) -> None:
        await self._guard._enter()

    async def __aexit__(self, *exc: object) -> None:
        self._guard._leave()


@dataclass(frozen=True)
class Candidate:
    """Something a pass may delete: a request's outputs or inputs, or old temp files."""

    kind: str                       # outputs | inputs | temp
    request_id: str | None
    files: tuple[FileInfo, ...]
    folder: Path | None = None      # the request folder, removed once empty
    why: str = ""


@dataclass
class Choice:
    """What a pass deletes among a request folders, and why not more when space was asked."""

    outputs: list[Candidate] = field(default_factory=list)
    estimate: int = 0               # bytes the outputs chosen should free
    short: str = ""                 # when asked for space and not enough can go: why


def _size(files: Iterable[FileInfo], shared: set) -> int:
    sizes = {f.key: f.size for f in files if f.key not in shared}
    return sum(sizes.values())


def choose_outputs(inventory: OutputInventory, policy: RetentionPolicy, *, needed: set[str],
                   readable: Callable[[str], bool], uploaded: set[str], now: float,
                   want_bytes: int = 0) -> Choice:
    """Pure: which finished requests' outputs a pass deletes, oldest first.

    By the rule (result expired, or uploaded), then over the cap, then for `want_bytes` (the
    disk guard's ask: finished at least `pressure_min_age` ago). A file linked from a request
    that stays is kept, and so is ComfyUI's original of it."""
    choice = Choice()
    if not policy.deletes_outputs:
        if want_bytes:
            choice.short = policy.off_reason()
        return choice
    by_age = sorted(inventory.requests.values(), key=lambda r: r.mtime)
    finished = [r for r in by_age if r.request_id not in needed]
    kept_keys: set = set()
    for request in by_age:
        if request.request_id in needed:
            kept_keys |= request.keys
    chosen: dict[str, str] = {}
    for request in finished:
        if policy.outputs == "uploaded" and request.request_id in uploaded:
            chosen[request.request_id] = "uploaded to S3"
        elif not readable(request.request_id):
            chosen[request.request_id] = "result expired"

    def freed() -> int:
        return sum(_size(r.files, kept_keys) for r in finished if r.request_id in chosen)

    size = inventory.bytes - freed()
    cap = policy.outputs_max_bytes
    if cap and size > cap:
        for request in finished:
            if size <= cap:
                break
            if request.request_id not in chosen:
                chosen[request.request_id] = "output folder over retention.outputs_max_gb"
                size -= _size(request.files, kept_keys)
    if want_bytes:
        young = 0
        for request in finished:
            if freed() >= want_bytes:
                break
            if request.request_id in chosen:
                continue
            if now - request.mtime < policy.pressure_min_age:
                young += 1
                continue
            chosen[request.request_id] = "the disk guard asked for space"
        if freed() < want_bytes:
            choice.short = _short_reason(inventory, finished, needed, young, policy)
    staying: set = set()
    for request in by_age:
        if request.request_id not in chosen:
            staying |= request.keys
    for request in finished:
        why = chosen.get(request.request_id)
        if why is None:
            continue
        files = [f for f in request.files]
        for key in request.keys - staying:
            files += inventory.others.get(key, [])  # ComfyUI's original of the request's file
        choice.outputs.append(Candidate("outputs", request.request_id, tuple(files),
                                        request.path, why))
    gone = {f.key: f.size for c in choice.outputs for f in c.files if f.key not in staying}
    choice.estimate = sum(gone.values())
    return choice


def _short_reason(inventory: OutputInventory, finished: list, needed: set[str], young: int,
                  policy: RetentionPolicy) -> str:
    if not inventory.exists:
        return f"the output folder {inventory.folder} is not on this machine"
    if young:
        return (f"nothing finished is old enough ({young} finished request(s) younger than "
                f"retention.pressure_min_age = {policy.pressure_min_age:g} s)")
    busy = sum(1 for r in inventory.requests if r in needed)
    if busy and not finished:
        return (f"the {busy} request(s) with files are still running, uploading or waiting "
                "for their webhook")
    linked = set().union(*(r.keys for r in inventory.requests.values())) \
        if inventory.requests else set()
    foreign = sum(infos[0].size for key, infos in inventory.others.items() if key not in linked)
    if not inventory.requests:
        return (f"no request has files in the output folder ({format_bytes(foreign)} there "
                "is ComfyUI's own or older, not any request's)")
    return f"nothing more may go ({format_bytes(foreign)} of the folder is no request's)"


@dataclass
class PassReport:
    """What one pass did (served at GET /retention, shown in /health, logged when it freed)."""

    at: float
    seconds: float = 0.0
    removed: dict[str, Removed] = field(default_factory=lambda: {k: Removed() for k in KINDS})
    requests: int = 0               # request folders removed
    reasons: dict[str, int] = field(default_factory=dict)
    asked_bytes: int = 0
    short: str = ""
    output_bytes: int = 0           # the output folder after the pass
    output_files: int = 0
    output_requests: int = 0
    cap_bytes: int = 0
    gone: set[str] = field(default_factory=set)  # request folders removed (not shown)

    @property
    def freed_bytes(self) -> int:
        return sum(r.bytes for r in self.removed.values())

    @property
    def freed_files(self) -> int:
        return sum(r.files for r in self.removed.values())

    def summary(self) -> str:
        """`retention freed 52.4 MB (51 files)`, or why it freed nothing it was asked for."""
        text = f"retention freed {format_bytes(self.freed_bytes)}"
        if self.freed_files:
            text += f" ({self.freed_files} files)"
        if self.short and self.freed_bytes < self.asked_bytes:
            text += f": {self.short}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {"at": round(self.at, 3), "seconds": round(self.seconds, 3),
                "freed_bytes": self.freed_bytes, "freed_files": self.freed_files,
                "removed": {k: {"files": r.files, "bytes": r.bytes}
                            for k, r in self.removed.items()},
                "requests": self.requests, "reasons": dict(self.reasons),
                "asked_bytes": self.asked_bytes, "short": self.short,
                "summary": self.summary(),
                "output_folder": {"bytes": self.output_bytes, "files": self.output_files,
                                  "requests": self.output_requests,
                                  "cap_bytes": self.cap_bytes}}


class Retention:
    """The wrapper's retention part: a pass every `policy.interval`, and one on demand."""

    def __init__(self, policy: RetentionPolicy, lifecycle: Lifecycle, *,
                 output_folder: Callable[[], Path], input_folder: Path | None = None,
                 temp_folder: Path | None = None):
        self.policy = policy
        self.lifecycle = lifecycle
        self.guard = FileGuard()
        self._folders = FolderCache()  # request folders unchanged since the last walk
        self._output_folder = output_folder
        self._input_folder = input_folder
        self._temp_folder = temp_folder
        # Bounded by the requests with files on disk: each pass forgets the ids it no longer
        # finds there (and inputs go with their request).
        self._inputs: dict[str, list[FileInfo]] = {}  # request id -> its uploaded images
        self._uploaded: set[str] = set()   # finished with every output in S3
        self._finished: set[str] = set()   # finished here (the store may forget them first)
        self.totals: dict[str, Removed] = {k: Removed() for k in KINDS}
        self.last: PassReport | None = None
        self._pass = asyncio.Lock()
        self._task: asyncio.Task | None = None

    # --- what the request path tells it ---------------------------------------------------------
    def input_uploaded(self, request_id: str, path: Path) -> None:
        """An image uploaded into ComfyUI's input folder for `request_id`."""
        if self.policy.enabled and self.policy.inputs == "finished":
            # Its size is read when it is deleted.
            self._inputs.setdefault(request_id, []).append(FileInfo(str(path), (0, 0), 0, 0.0))

    def finished(self, request_id: str, outputs: list[dict[str, Any]]) -> None:
        """The request ended; `outputs` are its result's entries (with `url` once uploaded)."""
        self._finished.add(request_id)
        files = [e for e in outputs if e.get("type") != "text" and e.get("local_path")]
        if files and all(e.get("url") for e in files):
            self._uploaded.add(request_id)

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.policy.enabled:
            logger.info("retention is off (retention.enabled = false): nothing is deleted")
            return
        await self._recover_inputs()
        self._task = asyncio.create_task(self._loop(), name="retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.run()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one pass must not end retention
                logger.exception("retention pass failed")
            await asyncio.sleep(self.policy.interval)

    async def _recover_inputs(self) -> None:
        """Images an earlier run uploaded for requests it finished (the store knows them)."""
        folder = self._input_folder
        if folder is None or self.policy.inputs != "finished":
            return
        found = await asyncio.to_thread(list_top, folder)
        for info in found:
            match = _INPUT_NAME.match(os.path.basename(info.path))
            if match and self.lifecycle.known(match["id"]):
                self._inputs.setdefault(match["id"], []).append(info)

    # --- a pass ---------------------------------------------------------------------------------
    async def run(self, want_bytes: int = 0) -> PassReport:
        """One pass; `want_bytes` > 0 is the disk guard asking for that much space."""
        async with self._pass:
            return await self._run(want_bytes)

    async def _run(self, want_bytes: int) -> PassReport:
        started = time.monotonic()
        report = PassReport(time.time(), asked_bytes=want_bytes,
                            cap_bytes=self.policy.outputs_max_bytes)
        if not self.policy.enabled:
            report.short = self.policy.off_reason()
            self.last = report
            return report
        folder = self._output_folder()
        needed = self.lifecycle.needed()
        before = (set(self._finished), set(self._uploaded))
        known = self._is_request
        inventory = await asyncio.to_thread(scan_outputs, folder, known, self._folders)
        choice = choose_outputs(inventory, self.policy, needed=needed,
                                readable=self.lifecycle.readable, uploaded=self._uploaded,
                                now=time.time(), want_bytes=want_bytes)
        candidates = list(choice.outputs)
        if self.policy.inputs == "finished":
            candidates += [Candidate("inputs", rid, tuple(files))
                           for rid, files in self._inputs.items() if rid not in needed]
        if self.policy.temp_max_age and self._temp_folder is not None:
            old = await asyncio.to_thread(old_files, self._temp_folder, self.policy.temp_max_age)
            if old:
                candidates.append(Candidate("temp", None, tuple(old), why="older than "
                                            "retention.temp_max_age"))
        await self._delete(candidates, report)
        self._forget(inventory, report, before)
        report.short = choice.short
        report.output_bytes = max(0, inventory.bytes - report.removed["outputs"].bytes)
        report.output_files = max(0, inventory.files - report.removed["outputs"].files)
        report.output_requests = len(inventory.requests) - report.requests
        report.seconds = time.monotonic() - started
        self.last = report
        if report.freed_files:
            logger.info("%s: %s; output folder %s in %d file(s)%s", report.summary(),
                        _breakdown(report), format_bytes(report.output_bytes),
                        report.output_files,
                        f" (cap {format_bytes(report.cap_bytes)})" if report.cap_bytes else "")
        elif want_bytes:
            logger.warning("%s (asked for %s)", report.summary(), format_bytes(want_bytes))
        return report

    def _is_request(self, name: str) -> bool:
        # Called from the walk's thread: set and dict lookups only.
        return name in self._finished or self.lifecycle.known(name) or \
            name in self._inputs

    async def _delete(self, candidates: list[Candidate], report: PassReport) -> None:
        """Delete in steps of `batch_files`, each in a thread with writers held off; the needed
        requests are asked again before every step."""
        batch: list[Candidate] = []
        count = 0
        for candidate in candidates:
            batch.append(candidate)
            count += len(candidate.files)
            if count >= self.policy.batch_files:
                await self._step(batch, report)
                batch, count = [], 0
        if batch:
            await self._step(batch, report)

    async def _step(self, batch: list[Candidate], report: PassReport) -> None:
        async with self.guard.deleting():
            needed = self.lifecycle.needed()
            go = [c for c in batch if c.request_id is None or c.request_id not in needed]
            results = await asyncio.to_thread(_remove_all, go)
        for candidate, removed in zip(go, results):
            report.removed[candidate.kind].add(removed)
            self.totals[candidate.kind].add(removed)
            if candidate.kind == "outputs" and candidate.request_id is not None:
                report.requests += 1
                report.gone.add(candidate.request_id)
                report.reasons[candidate.why] = report.reasons.get(candidate.why, 0) + 1
            elif candidate.kind == "inputs" and candidate.request_id is not None:
                self._inputs.pop(candidate.request_id, None)
            for error in removed.errors[:3]:
                logger.warning("retention could not delete %s", error)

    def _forget(self, inventory: OutputInventory, report: PassReport,
                before: tuple[set[str], set[str]]) -> None:
        """Forget finished requests with nothing left on disk, so the sets stay bounded by
        what is on disk (those that finished during the pass stay for the next one)."""
        keep = (set(inventory.requests) - report.gone) | set(self._inputs)
        self._finished = (self._finished & keep) | (self._finished - before[0])
        self._uploaded = (self._uploaded & keep) | (self._uploaded - before[1])

    # --- what it shows --------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        p = self.policy
        return {"enabled": p.enabled, "outputs": p.outputs, "inputs": p.inputs,
                "outputs_max_bytes": p.outputs_max_bytes, "temp_max_age": p.temp_max_age,
                "interval": p.interval,
                "removed": {k: {"files": r.files, "bytes": r.bytes}
                            for k, r in self.totals.items()},
                "last_pass": self.last.to_json() if self.last else None}


def _remove_all(candidates: list[Candidate]) -> list[Removed]:
    return [remove(c.files, [c.folder] if c.folder is not None else []) for c in candidates]


def _breakdown(report: PassReport) -> str:
    parts = []
    outputs = report.removed["outputs"]
    if outputs.files:
        why = ", ".join(f"{n} {reason}" for reason, n in report.reasons.items())
        parts.append(f"outputs of {report.requests} request(s) ({why}) "
                     f"{format_bytes(outputs.bytes)}")
    for kind in ("inputs", "temp"):
        removed = report.removed[kind]
        if removed.files:
            parts.append(f"{kind} {removed.files} file(s) {format_bytes(removed.bytes)}")
    return "; ".join(parts)
