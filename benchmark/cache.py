"""The verdict cache and the run history, in ``<state_dir>/benchmark/``.

``verdict.json`` holds the last good report with the key it was measured under. It is reused
only while every part of the key is unchanged (the GPU itself, its driver, ComfyUI's version and
device, the workload) and it is younger than ``benchmark.cache_max_age``; any change reruns the
benchmark. Only good verdicts (pass, no_reference) are cached: after an error or a slow verdict
the next start measures again, so a node whose operator fixed the cause gets a fresh chance.

``history.jsonl`` gets one line per benchmark actually run (errors included). Drift compares a
run with the median of earlier runs of the same workload on the same GPU, across driver and
ComfyUI upgrades on purpose: a slowdown after an upgrade is what drift should show.

All methods do blocking file I/O: call them through ``asyncio.to_thread`` from async code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.models import BenchmarkReport, BenchmarkStatus

logger = logging.getLogger(__name__)

VERDICT_FILE = "verdict.json"
HISTORY_FILE = "history.jsonl"
HISTORY_MAX_BYTES = 1024 * 1024  # past this, the history is cut to its last HISTORY_KEEP lines
HISTORY_KEEP = 1000
CACHEABLE = frozenset({BenchmarkStatus.PASS, BenchmarkStatus.NO_REFERENCE})
# Parts of the key that name the same work on the same GPU (see the module doc).
DRIFT_FIELDS = ("gpu_uuid", "graph_fingerprint", "width", "height", "steps", "checkpoint")


@dataclass(frozen=True)
class CacheKey:
    gpu_uuid: str
    driver_version: str
    comfyui_version: str
    comfyui_device: str
    graph_fingerprint: str
    width: int
    height: int
    steps: int
    checkpoint: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CacheKey":
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def for_report(cls, report: BenchmarkReport) -> "CacheKey":
        gpu = report.gpu
        p = report.params
        return cls(gpu_uuid=(gpu.uuid if gpu else None) or "",
                   driver_version=(gpu.driver_version if gpu else None) or "",
                   comfyui_version=report.comfyui_version, comfyui_device=report.comfyui_device,
                   graph_fingerprint=report.graph_fingerprint, width=p.width, height=p.height,
                   steps=p.steps, checkpoint=p.checkpoint)

    def differences(self, other: "CacheKey") -> list[str]:
        """``"driver_version 535.1 -> 550.2"`` for each field that differs."""
        out = []
        for f in dataclasses.fields(self):
            old, new = getattr(other, f.name), getattr(self, f.name)
            if old != new:
                out.append(f"{f.name} {old or '-'} -> {new or '-'}")
        return out


@dataclass(frozen=True)
class CacheLookup:
    report: BenchmarkReport | None  # marked from_cache when found
    why: str  # human: why it was (not) reused

    @property
    def hit(self) -> bool:
        return self.report is not None


class BenchmarkStore:
    """The files under ``<state_dir>/benchmark``."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    @classmethod
    def for_state_dir(cls, state_dir: str | os.PathLike[str]) -> "BenchmarkStore":
        return cls(Path(state_dir) / "benchmark")

    @property
    def verdict_path(self) -> Path:
        return self.folder / VERDICT_FILE

    @property
    def history_path(self) -> Path:
        return self.folder / HISTORY_FILE

    # --- the verdict cache ----------------------------------------------------------------------
    def lookup(self, key: CacheKey, max_age: float, *, now: float | None = None) -> CacheLookup:
        now = time.time() if now is None else now
        if max_age <= 0:
            return CacheLookup(None, "caching is off (benchmark.cache_max_age = 0)")
        try:
            data = json.loads(self.verdict_path.read_text(encoding="utf-8"))
            saved_key = CacheKey.from_dict(data["key"])
            saved_at = float(data["saved_at"])
            report = BenchmarkReport.from_dict(data["report"])
        except FileNotFoundError:
            return CacheLookup(None, "no cached result")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("benchmark cache %s unreadable (%s); running the benchmark",
                           self.verdict_path, exc)
            return CacheLookup(None, f"cached result unreadable: {exc}")
        changed = key.differences(saved_key)
        if changed:
            return CacheLookup(None, "changed since the cached result: " + ", ".join(changed))
        age = now - saved_at
        if age < 0 or age > max_age:
            return CacheLookup(None, f"cached result is {age / 3600:.1f} h old "
                                     f"(limit {max_age / 3600:.1f} h)")
        return CacheLookup(dataclasses.replace(report, from_cache=True),
                           f"reused the result from {age / 3600:.1f} h ago")

    def save(self, key: CacheKey, report: BenchmarkReport, *, now: float | None = None) -> None:
        """Keep ``report`` as the cached verdict; a slow or failed one is not kept (and drops any
        older cached verdict, which it contradicts)."""
        if report.status not in CACHEABLE:
            self.clear()
            return
        payload = {"key": key.to_dict(), "saved_at": time.time() if now is None else now,
                   "report": dataclasses.replace(report, from_cache=False).to_dict()}
        self._write_atomic(self.verdict_path, json.dumps(payload, indent=1))

    def clear(self) -> None:
        try:
            self.verdict_path.unlink()
        except FileNotFoundError:
            pass

    # --- the history ----------------------------------------------------------------------------
    def append_history(self, key: CacheKey, report: BenchmarkReport) -> None:
        entry = {
            "timestamp": report.timestamp,
            "status": report.status.value,
            "seconds": report.seconds,
            "its": report.its,
            "expected_seconds": report.expected_seconds,
            "load_seconds": report.load_seconds,
            "reason": report.reason(),
            "key": key.to_dict(),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.history_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
        self._trim_history()

    def history(self) -> list[dict[str, Any]]:
        """Every readable history line, oldest first (a damaged line is skipped)."""
        try:
            text = self.history_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:  # drift is a nicety; an unreadable history only disables it
            logger.warning("benchmark history %s unreadable: %s", self.history_path, exc)
            return []
        entries = []
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def history_seconds(self, key: CacheKey) -> list[float]:
        """Seconds of earlier measured runs of the same workload on the same GPU."""
        wanted = {name: getattr(key, name) for name in DRIFT_FIELDS}
        found = []
        for entry in self.history():
            seconds = entry.get("seconds")
            entry_key = entry.get("key") or {}
            if entry.get("status") == BenchmarkStatus.ERROR.value or not seconds:
                continue
            if all(entry_key.get(name) == value for name, value in wanted.items()):
                found.append(float(seconds))
        return found

    # --- files ----------------------------------------------------------------------------------
    def _trim_history(self) -> None:
        try:
            if self.history_path.stat().st_size <= HISTORY_MAX_BYTES:
                return
            lines = self.history_path.read_text(encoding="utf-8").splitlines()[-HISTORY_KEEP:]
        except OSError:
            return
        self._write_atomic(self.history_path, "\n".join(lines) + "\n")

    def _write_atomic(self, path: Path, text: str) -> None:
        # A crash mid-write must leave the old file, never half a file.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
