"""Download progress as plain numbers, and the few words that describe it.

The engine updates a `FileProgress` as bytes arrive; the daemon's reason line, `/health`, the
metrics and the CLI's bars all read the same object.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

_UNITS = ("B", "KB", "MB", "GB", "TB")


def human_bytes(count: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disk and network speeds are quoted)."""
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1000 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def pair(done: float, total: float | None) -> str:
    """'1.2/2.1 GB' when both share a unit, else '300.0 MB/2.1 GB'; total unknown: '1.2 GB'."""
    if not total:
        return human_bytes(done)
    left, right = human_bytes(done), human_bytes(total)
    if left.split()[-1] == right.split()[-1]:
        return f"{left.split()[0]}/{right}"
    return f"{left}/{right}"


@dataclass
class FileProgress:
    """One file's transfer. `done` counts bytes received, resumed bytes included (every byte
    received is written, even when the connection is cut)."""

    name: str
    total: int | None = None
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    _window: list[tuple[float, int]] = field(default_factory=list, repr=False)
    # boto3 reports S3 progress from its worker threads.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def advance(self, count: int) -> None:
        with self._lock:
            self.done += count
            now = time.monotonic()
            self._window.append((now, self.done))
            while len(self._window) > 2 and now - self._window[0][0] > 5.0:
                self._window.pop(0)

    def reset(self, done: int = 0) -> None:
        with self._lock:
            self.done = done
            self._window.clear()

    @property
    def rate(self) -> float:
        """Bytes per second over the last few seconds (0 before two readings)."""
        with self._lock:
            if len(self._window) < 2:
                return 0.0
            (t0, b0), (t1, b1) = self._window[0], self._window[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    @property
    def eta(self) -> float | None:
        rate = self.rate
        if not self.total or rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / rate)

    def describe(self) -> str:
        """'v1-5-pruned-emaonly 1.2/2.1 GB at 85 MB/s, ETA 11 s'."""
        text = f"{self.name} {pair(self.done, self.total)}"
        rate = self.rate
        if rate > 0:
            text += f" at {human_bytes(rate)}/s"
        eta = self.eta
        if eta is not None:
            text += f", ETA {eta:.0f} s"
        return text

    def to_dict(self) -> dict:
        return {"name": self.name, "done_bytes": self.done, "total_bytes": self.total,
                "bytes_per_second": round(self.rate), "eta_s": None if self.eta is None
                else round(self.eta, 1)}
