"""The XID meaning table (``config/xid_codes.toml``) and its lookup."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping

from .errors import XidTableError
from .model import Severity

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

log = logging.getLogger(__name__)

UNKNOWN_SEVERITY = Severity.WARNING


@dataclass(frozen=True)
class XidInfo:
    code: int
    meaning: str
    severity: Severity


class XidTable:
    """Maps XID numbers to a meaning and a severity."""

    def __init__(self, entries: Mapping[int, XidInfo]) -> None:
        self._entries = dict(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, code: object) -> bool:
        return code in self._entries

    def lookup(self, code: int) -> XidInfo:
        known = self._entries.get(code)
        if known is not None:
            return known
        return XidInfo(code=code, meaning="unknown XID", severity=UNKNOWN_SEVERITY)

    @classmethod
    def parse(cls, data: Mapping[str, object], *, source: str = "<table>") -> "XidTable":
        raw = data.get("xid", {})
        if not isinstance(raw, Mapping):
            raise XidTableError(f"{source}: [xid] must be a table of XID entries")
        entries: dict[int, XidInfo] = {}
        for key, body in raw.items():
            try:
                code = int(key)
            except ValueError:
                raise XidTableError(f"{source}: xid.{key}: the key must be an XID number") from None
            if not isinstance(body, Mapping):
                raise XidTableError(f"{source}: xid.{key}: expected a table with meaning and severity")
            meaning = body.get("meaning")
            if not isinstance(meaning, str) or not meaning:
                raise XidTableError(f"{source}: xid.{key}: 'meaning' must be a non-empty string")
            try:
                severity = Severity(body.get("severity"))
            except ValueError:
                allowed = ", ".join(s.value for s in Severity)
                raise XidTableError(
                    f"{source}: xid.{key}: 'severity' must be one of {allowed}"
                ) from None
            entries[code] = XidInfo(code=code, meaning=meaning, severity=severity)
        return cls(entries)


def default_table_path() -> Path:
    return Path(str(resources.files("config").joinpath("xid_codes.toml")))


def load_xid_table(path: str | Path | None = None) -> XidTable:
    """Load the table from ``path`` (default: the packaged ``config/xid_codes.toml``)."""
    target = Path(path) if path is not None else default_table_path()
    with open(target, "rb") as fh:
        try:
            data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise XidTableError(f"{target}: {exc}") from None
    table = XidTable.parse(data, source=str(target))
    log.debug("loaded %d XID entries from %s", len(table), target)
    return table
