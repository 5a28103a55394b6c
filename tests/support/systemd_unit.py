"""The shipped systemd unit, read the way systemd reads it: its directives, its time spans, and
the stop timeout the daemon's shutdown stages must fit inside."""

from __future__ import annotations

import re
from pathlib import Path

UNIT_PATH = Path(__file__).resolve().parents[2] / "systemd" / "comfy-worker.service"
# systemd's DefaultTimeoutStopSec= when a unit does not set its own.
SYSTEMD_DEFAULT_TIMEOUT_STOP_SEC = 90.0

_TIMESPAN_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}


def parse_unit(path: Path = UNIT_PATH) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (keys like ReadWritePaths= repeat).

    Follows systemd's syntax closely enough for our file: '#'/';' comments, backslash
    line continuation, and an empty assignment resetting the list.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise ValueError(f"{path}: cannot parse line {raw!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        if value == "":
            current[key] = []
        else:
            current.setdefault(key, []).append(value)
    return sections


def unit_value(section: str, key: str, path: Path = UNIT_PATH) -> str | None:
    """The effective (last) value of a directive, None when absent or reset."""
    values = parse_unit(path).get(section, {}).get(key)
    return values[-1] if values else None


def parse_timespan(text: str) -> float:
    """systemd time span ("90", "90s", "1min 30s", "500ms", "infinity") in seconds."""
    text = text.strip()
    if text == "infinity":
        return float("inf")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    total, pos = 0.0, 0
    for match in re.finditer(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)", text):
        if match.start() != pos or match.group(2) not in _TIMESPAN_UNITS:
            raise ValueError(f"not a systemd time span: {text!r}")
        total += float(match.group(1)) * _TIMESPAN_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"not a systemd time span: {text!r}")
    return total


def unit_timeout_stop_sec(path: Path = UNIT_PATH) -> float:
    """Seconds systemd waits after SIGTERM before SIGKILLing the whole unit."""
    value = unit_value("Service", "TimeoutStopSec", path)
    return SYSTEMD_DEFAULT_TIMEOUT_STOP_SEC if value is None else parse_timespan(value)
