"""The disk guard: free space of the filesystems the worker writes to, and what it means.

The folders that fill a node's disk — each instance's outputs, inputs and temp files, the models,
the state (results, the webhook spool, the benchmark) and the logs — are sampled with the other
telemetry (every ``gpu.sample_interval``, statvfs in a thread) and grouped by filesystem. Each
filesystem gets a level from ``disk.*``:

* **warning** (``disk.warning_percent`` full, or under ``disk.warning_free_gb`` free): the
  instances whose folders are on it are asked at once to free what their retention may
  (``POST /retention`` on the wrapper; `api.wrapper.retention`), the filesystem is sampled again,
  and what remains is a warning (degraded, serving) that names the filesystem and what retention
  freed;
* **critical** (``disk.critical_percent``, ``disk.critical_free_gb``): those instances take no
  new work (unhealthy) with the reason, e.g. ``disk /opt/ComfyUI/output 97% full (2.1 GB free);
  retention freed 0 B: nothing finished is old enough``, until space returns — before ComfyUI
  and the wrapper fail their writes.

A filesystem that holds only the models is at most a warning: nothing a request writes goes
there (a model download may fail, and says so itself).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from api.host.disk import Room, format_bytes, room
from supervisor.state import OK, Level, Verdict

logger = logging.getLogger(__name__)

#: The roles a watched folder plays, in the order a reason names them.
ROLES = ("outputs", "inputs", "temp", "state", "logs", "models")
#: Roles whose filesystem running out stops requests (a models-only filesystem does not).
_WRITTEN_BY_REQUESTS = {"outputs", "inputs", "temp", "state", "logs"}
#: Roles retention can free space in.
_RETENTION_ROLES = {"outputs", "inputs", "temp"}
#: Seconds between two asks for space after one that freed nothing, while a filesystem stays at
#: warning or worse (unless it gets worse meanwhile): a pass walks the output folder.
ASK_EVERY = 30.0
#: Seconds the guard waits for a wrapper's retention pass.
ASK_TIMEOUT = 60.0
_GB = 1_000_000_000
_LEVEL_VALUE = {Level.OK: 0, Level.DEGRADED: 1, Level.UNHEALTHY: 2}


@dataclass(frozen=True)
class Watched:
    """One folder the worker writes to; `instance` is None for the worker's own (state, logs,
    models shared by all)."""

    role: str
    path: Path
    instance: int | None = None

    def label(self, several: bool) -> str:
        return self.role if self.instance is None or not several else \
            f"{self.role} of instance {self.instance}"


@dataclass(frozen=True)
class DiskThresholds:
    warning_percent: float = 90.0
    warning_free: int = 5 * _GB
    critical_percent: float = 97.0
    critical_free: int = 1 * _GB

    @classmethod
    def from_settings(cls, settings: Any) -> "DiskThresholds":
        d = settings.disk
        return cls(d.warning_percent, int(d.warning_free_gb * _GB), d.critical_percent,
                   int(d.critical_free_gb * _GB))

    def level(self, found: Room) -> Level:
        if found.percent_full >= self.critical_percent or found.free < self.critical_free:
            return Level.UNHEALTHY
        if found.percent_full >= self.warning_percent or found.free < self.warning_free:
            return Level.DEGRADED
        return Level.OK

    def to_free(self, found: Room) -> int:
        """Bytes to free for `found` to be under the warning thresholds again."""
        by_free = self.warning_free - found.free
        by_percent = found.used - int(found.total * self.warning_percent / 100.0)
        return max(0, by_free, by_percent)


@dataclass(frozen=True)
class Filesystem:
    """One filesystem, as one sample found it, with the watched folders on it."""

    room: Room
    holds: tuple[Watched, ...]
    level: Level = Level.OK

    @property
    def shown(self) -> Watched:
        """The folder a reason names: outputs first (what fills), then inputs, temp..."""
        return min(self.holds, key=lambda w: (ROLES.index(w.role), w.instance or 0))

    @property
    def instances(self) -> set[int | None]:
        return {w.instance for w in self.holds}

    @property
    def written_by_requests(self) -> bool:
        return any(w.role in _WRITTEN_BY_REQUESTS for w in self.holds)

    def describe(self) -> str:
        """`disk /opt/ComfyUI/output 97% full (2.1 GB free)`."""
        r = self.room
        return (f"disk {self.shown.path} {r.percent_full:.0f}% full "
                f"({format_bytes(r.free)} free)")

    def holds_text(self, several: bool) -> str:
        labels = []
        for w in sorted(self.holds, key=lambda w: (ROLES.index(w.role), w.instance or 0)):
            text = w.label(several)
            if text not in labels:
                labels.append(text)
        return ", ".join(labels)


def sample(watched: Sequence[Watched]) -> list[Filesystem]:
    """Blocking (statvfs of each folder; run it in a thread): the filesystems holding
    `watched`, one entry each, in the order first met. A folder not made yet is counted on
    its parent's filesystem; one with no existing parent is left out."""
    found: dict[int, tuple[Room, list[Watched]]] = {}
    for folder in watched:
        r = room(folder.path)
        if r is None:
            continue
        if r.device in found:
            found[r.device][1].append(folder)
        else:
            found[r.device] = (r, [folder])
    return [Filesystem(r, tuple(holds)) for r, holds in found.values()]


@dataclass(frozen=True)
class Freed:
    """A wrapper's retention pass as the guard heard of it."""

    bytes: int
    summary: str            # "retention freed 0 B: nothing finished is old enough"


class Freer(Protocol):
    """Asks an instance's retention to free space (the wrapper's POST /retention)."""

    async def free(self, instance: int, want_bytes: int) -> Freed: ...


class WrapperRetention:
    """`Freer` over HTTP: each instance's wrapper, on loopback."""

    def __init__(self, urls: dict[int, str], session: Callable[[], aiohttp.ClientSession | None],
                 timeout: float = ASK_TIMEOUT):
        self._urls = urls
        self._session = session
        self._timeout = timeout

    async def free(self, instance: int, want_bytes: int) -> Freed:
        session, url = self._session(), self._urls.get(instance)
        if session is None or url is None:
            return Freed(0, "retention not asked (the wrapper is not up)")
        try:
            async with session.post(f"{url}/retention", json={"free_bytes": want_bytes},
                                    timeout=aiohttp.ClientTimeout(total=self._timeout)) as resp:
                if resp.status == 404:
                    return Freed(0, "the wrapper has no retention (wrapper.command is not "
                                    "comfy-worker's own)")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            return Freed(0, f"retention not reached ({type(exc).__name__}: {exc})")
        if not isinstance(body, dict):
            return Freed(0, "retention answered without a report")
        return Freed(int(body.get("freed_bytes") or 0), str(body.get("summary") or ""))


@dataclass
class _Judged:
    filesystem: Filesystem
    freed: str = ""           # what retention said the last time it was asked for this one


class DiskGuard:
    """Samples the watched folders, asks retention for space, and judges each instance."""

    def __init__(self, watched: Sequence[Watched], thresholds: DiskThresholds, *,
                 interval: float, freer: Freer | None = None,
                 sampler: Callable[[Sequence[Watched]], list[Filesystem]] = sample,
                 ask_every: float = ASK_EVERY, root: Path = Path("/")):
        self.root = root
        self._root: Room | None = None
        self.thresholds = thresholds
        self.interval = interval
        self._sampler = sampler
        self._ask_every = ask_every
        self.watch(watched, freer)
        self._judged: list[_Judged] = []
        # (device, instance) -> when retention was last asked, at what level, and whether it
        # freed anything then.
        self._asked: dict[tuple[int, int], tuple[float, Level, bool]] = {}
        self._freed_text: dict[int, str] = {}   # device -> what retention said last
        self.sampled_at: float | None = None
        self.on_change: Callable[[], None] | None = None
        self._task: asyncio.Task | None = None

    def watch(self, watched: Sequence[Watched] | Callable[[], Sequence[Watched]],
              freer: Freer | None = None) -> None:
        """What to watch, and whom to ask for space (the daemon knows both once its instances
        are planned). A callable is asked before every sample: an instance's folders can move
        once its running ComfyUI shows where they really are."""
        self._source = watched if callable(watched) else (lambda fixed=tuple(watched): fixed)
        self.freer = freer
        self._refresh()

    def _refresh(self) -> None:
        self.watched = tuple(self._source())
        self._several = len({w.instance for w in self.watched if w.instance is not None}) > 1

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.check()
        self._task = asyncio.create_task(self._loop(), name="disk-guard")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one check must not end the guard
                logger.exception("disk guard: check failed")

    # --- one check ------------------------------------------------------------------------------
    async def check(self) -> None:
        """Sample; ask retention where a filesystem is at warning or worse; sample again."""
        before = self._levels()
        filesystems = await self._sample()
        if self.freer is not None and await self._ask(filesystems):
            filesystems = await self._sample()
        self._judged = [_Judged(fs, self._freed_text.get(fs.room.device, ""))
                        for fs in filesystems]
        self.sampled_at = time.time()
        after = self._levels()
        if after != before:
            for fs in filesystems:
                if fs.level is not Level.OK:
                    log = logger.error if fs.level is Level.UNHEALTHY else logger.warning
                    log("%s (%s)", self._reason(self._judged_for(fs)), fs.holds_text(True))
            if before and all(level is Level.OK for level in after.values()):
                logger.info("disk: every filesystem the worker writes to has room again")
            if self.on_change is not None:
                self.on_change()

    async def _sample(self) -> list[Filesystem]:
        self._refresh()
        found, self._root = await asyncio.to_thread(self._sample_blocking)
        return [Filesystem(fs.room, fs.holds, self.thresholds.level(fs.room)) for fs in found]

    async def _ask(self, filesystems: list[Filesystem]) -> bool:
        """Ask the instances on each full-ish filesystem for space, one after another until
        enough is freed; True when any was asked."""
        asked = False
        now = time.monotonic()
        for fs in filesystems:
            if fs.level is Level.OK:
                self._freed_text.pop(fs.room.device, None)
                continue
            want = self.thresholds.to_free(fs.room)
            targets = sorted({w.instance for w in fs.holds
                              if w.role in _RETENTION_ROLES and w.instance is not None})
            texts = []
            for instance in targets:
                key = (fs.room.device, instance)
                if not self._should_ask(key, fs.level, now):
                    continue
                freed = await self.freer.free(instance, want)
                self._asked[key] = (now, fs.level, freed.bytes > 0)
                asked = True
                texts.append(freed.summary if len(targets) == 1 else
                             f"instance {instance}: {freed.summary}")
                want -= freed.bytes
                if want <= 0:
                    break
            if texts:
                self._freed_text[fs.room.device] = "; ".join(texts)
        return asked

    def _sample_blocking(self) -> tuple[list[Filesystem], Room | None]:
        return self._sampler(self.watched), room(self.root)

    def _should_ask(self, key: tuple[int, int], level: Level, now: float) -> bool:
        """At every sample while it frees something; after one that freed nothing, again only
        once the level got worse or `ask_every` has passed (a pass walks the output folder)."""
        last = self._asked.get(key)
        if last is None:
            return True
        at, then, freed = last
        return freed or _LEVEL_VALUE[level] > _LEVEL_VALUE[then] or now - at >= self._ask_every

    def _levels(self) -> dict[int, Level]:
        return {j.filesystem.room.device: j.filesystem.level for j in self._judged}

    def _judged_for(self, fs: Filesystem) -> _Judged:
        for judged in self._judged:
            if judged.filesystem is fs:
                return judged
        return _Judged(fs)

    def _reason(self, judged: _Judged) -> str:
        text = judged.filesystem.describe()
        return f"{text}; {judged.freed}" if judged.freed else text

    # --- verdicts -------------------------------------------------------------------------------
    def verdict(self, instance: int | None = None) -> Verdict:
        """The worst filesystem that holds this instance's folders or the worker's own."""
        level, reasons = Level.OK, []
        for judged in self._judged:
            fs = judged.filesystem
            if fs.level is Level.OK:
                continue
            if instance is not None and not fs.instances & {instance, None}:
                continue
            this = fs.level
            if this is Level.UNHEALTHY and not fs.written_by_requests:
                this = Level.DEGRADED  # only the models there: requests still write elsewhere
            if _LEVEL_VALUE[this] > _LEVEL_VALUE[level]:
                level = this
            reasons.append(self._reason(judged))
        return Verdict(level, tuple(reasons)) if reasons else OK

    # --- what it shows --------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        summary = self.verdict()
        return {"level": summary.level.value, "reason": summary.reason,
                "sampled_at": self.sampled_at,
                "thresholds": {"warning_percent": self.thresholds.warning_percent,
                               "warning_free_bytes": self.thresholds.warning_free,
                               "critical_percent": self.thresholds.critical_percent,
                               "critical_free_bytes": self.thresholds.critical_free},
                "filesystems": [self._fs_json(j, paths=True) for j in self._judged]}

    def public(self) -> dict[str, Any]:
        """For /health: levels and room, no paths."""
        summary = self.verdict()
        return {"level": summary.level.value,
                "filesystems": [self._fs_json(j, paths=False) for j in self._judged]}

    def _fs_json(self, judged: _Judged, *, paths: bool) -> dict[str, Any]:
        fs, r = judged.filesystem, judged.filesystem.room
        body: dict[str, Any] = {"holds": fs.holds_text(self._several), "level": fs.level.value,
                                "percent_full": round(r.percent_full, 1), "free_bytes": r.free,
                                "size_bytes": r.total}
        if judged.freed:
            body["retention"] = judged.freed
        if paths:
            body["path"] = str(fs.shown.path)
            body["paths"] = {w.label(True): str(w.path) for w in fs.holds}
        return body

    def used_gib(self) -> float | None:
        """Used GiB of the root filesystem at the last sample (None before the first): the
        autoscaler's `disk_usage`, measured as the Vast SDK measures it
        (psutil.disk_usage("/").used / 2**30: blocks in use, statvfs)."""
        return self._root.used / 2**30 if self._root is not None else None

    def metric_families(self) -> Iterable[Metric]:
        labels = ["path", "holds"]
        free = GaugeMetricFamily("comfy_worker_disk_free_bytes",
                                 "Free bytes of each filesystem the worker writes to.", labels=labels)
        size = GaugeMetricFamily("comfy_worker_disk_size_bytes",
                                 "Size in bytes (used + free) of each filesystem the worker "
                                 "writes to.", labels=labels)
        level = GaugeMetricFamily("comfy_worker_disk_level",
                                  "The disk guard's level of each filesystem: 0 ok, 1 warning "
                                  "(retention asked to free space), 2 critical (its instances "
                                  "take no work).", labels=labels)
        for judged in self._judged:
            fs = judged.filesystem
            values = [str(fs.shown.path), fs.holds_text(self._several)]
            free.add_metric(values, fs.room.free)
            size.add_metric(values, fs.room.total)
            level.add_metric(values, _LEVEL_VALUE[fs.level])
        return [free, size, level]


def watched_folders(plans: Sequence[Any], settings: Any) -> list[Watched]:
    """The folders to watch: each instance's outputs, inputs and temp files and its state; the
    logs and the models (shared by every instance). `plans` are the instances' plans
    (`supervisor.instances.plan.InstancePlan`)."""
    watched: list[Watched] = []
    for plan in plans:
        folders = plan.folders
        watched += [Watched("outputs", folders.output.path, plan.number),
                    Watched("inputs", folders.input.path, plan.number),
                    Watched("temp", folders.temp.path, plan.number),
                    Watched("state", Path(plan.state_dir), plan.number)]
    models = {p.folders.models.path for p in plans}
    watched += [Watched("models", path) for path in sorted(models)]
    watched += [Watched("logs", Path(settings.worker.log_dir)),
                Watched("state", Path(settings.worker.state_dir))]
    return watched
