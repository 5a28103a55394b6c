"""Value types for settings: each knows how to read a TOML value and an environment string.

A type answers two questions for the loader: "is this value acceptable?" and, when it is not,
"what did we expect?" — so an error can name the key, its source and the expectation in one line.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class InvalidValue(ValueError):
    """A value that does not fit its type; the message says what was expected."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingType:
    expected: str = "a value"
    toml_name: str = "string"

    def from_toml(self, value: Any) -> Any:
        return self.check(value)

    def from_env(self, text: str) -> Any:
        return self.check(text)

    def check(self, value: Any) -> Any:
        return value

    def to_toml(self, value: Any) -> str:
        return json.dumps(value)

    def fail(self) -> InvalidValue:
        return InvalidValue(f"expected {self.expected}")


@dataclass(frozen=True)
class _Number(SettingType):
    """A number within optional bounds; subclasses say which kind and how to parse it."""

    minimum: float | None = None
    maximum: float | None = None
    noun = "a number"

    @property
    def expected(self) -> str:  # type: ignore[override]
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            return f"{self.noun} from {self.show(low)} to {self.show(high)}"
        if low is not None:
            return f"{self.noun} of at least {self.show(low)}"
        return self.noun

    def show(self, bound: float) -> str:
        return f"{bound:g}"

    def parse(self, text: str) -> float:
        raise NotImplementedError

    def from_env(self, text: str) -> float:
        try:
            return self.check(self.parse(text.strip()))
        except ValueError:
            raise self.fail() from None

    def in_range(self, value: float) -> float:
        if (self.minimum is not None and value < self.minimum) or \
                (self.maximum is not None and value > self.maximum):
            raise self.fail()
        return value


@dataclass(frozen=True)
class Int(_Number):
    noun = "an integer"

    def show(self, bound: float) -> str:
        return str(bound)

    def parse(self, text: str) -> int:
        return int(text, 10)

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail()
        return self.in_range(value)


@dataclass(frozen=True)
class Float(_Number):
    noun = "a number"

    def parse(self, text: str) -> float:
        return float(text)

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail()
        value = float(value)
        if value != value:  # NaN
            raise self.fail()
        return self.in_range(value)


class Bool(SettingType):
    expected = "true or false"
    toml_name = "boolean"

    def from_env(self, text: str) -> bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise self.fail()

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail()
        return value

    def to_toml(self, value: Any) -> str:
        return "true" if value else "false"


@dataclass(frozen=True)
class Str(SettingType):
    choices: tuple[str, ...] = ()

    @property
    def expected(self) -> str:  # type: ignore[override]
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        return "a string"

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self.fail()
        if self.choices and value not in self.choices:
            raise self.fail()
        return value


class VersionOrAuto(SettingType):
    """``"auto"``, or a version number such as ``0.3.64`` (a leading ``v`` is allowed)."""

    expected = "\"auto\" or a version number such as \"0.3.64\""

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self.fail()
        value = value.strip()
        if value == "auto":
            return value
        parts = value[1:] if value.startswith("v") else value
        if not parts or not all(p.isdigit() for p in parts.split(".")) or parts.count(".") > 2:
            raise self.fail()
        return parts


class Url(SettingType):
    """An http(s) URL, or empty for "not set"."""

    expected = "an http:// or https:// URL (or empty)"

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self.fail()
        value = value.strip()
        if not value:
            return ""
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise self.fail()
        return value.rstrip("/")


class PathType(SettingType):
    """A filesystem path; empty means "not set" and stays None."""

    expected = "a filesystem path"

    def check(self, value: Any) -> Path | None:
        if isinstance(value, Path):
            return value
        if not isinstance(value, str):
            raise self.fail()
        value = value.strip()
        return Path(value).expanduser() if value else None

    def to_toml(self, value: Any) -> str:
        return json.dumps(str(value) if value is not None else "")


class StrList(SettingType):
    """A list of strings: a TOML array, or in the environment a JSON array or a shell-quoted line."""

    expected = "a list of strings (TOML array; in the environment a JSON array or a shell-style line)"
    toml_name = "array"

    def from_env(self, text: str) -> list[str]:
        text = text.strip()
        if text.startswith("["):
            try:
                return self.check(json.loads(text))
            except json.JSONDecodeError:
                raise self.fail() from None
        try:
            return shlex.split(text)
        except ValueError:
            raise self.fail() from None

    def check(self, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail()
        return list(value)


class StrMap(SettingType):
    """A table of string values: a TOML table, or a JSON object in the environment."""

    expected = "a table of strings (TOML table; in the environment a JSON object)"
    toml_name = "table"

    def from_env(self, text: str) -> dict[str, str]:
        try:
            return self.check(json.loads(text))
        except json.JSONDecodeError:
            raise self.fail() from None

    def check(self, value: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            raise self.fail()
        out: dict[str, str] = {}
        for key, item in value.items():
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise self.fail()
            out[str(key)] = str(item)
        return out

    def to_toml(self, value: Any) -> str:
        inner = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"


class TableList(SettingType):
    """A list of tables (TOML ``[[section.key]]``), or a JSON array of objects in the environment.

    Only the shape is checked here; the owner of the list validates each table's fields, so its
    messages can name the entry and the field."""

    expected = "a list of tables (TOML [[...]] tables; in the environment a JSON array of objects)"
    toml_name = "array of tables"

    def from_env(self, text: str) -> list[dict[str, Any]]:
        try:
            return self.check(json.loads(text))
        except json.JSONDecodeError:
            raise self.fail() from None

    def check(self, value: Any) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail()
        return [dict(v) for v in value]

    def to_toml(self, value: Any) -> str:
        return json.dumps(value)


class GpuSelection(SettingType):
    """Which GPUs get an instance: "all", or a list of NVML indexes, or a list of GPU UUIDs.

    In the environment: ``all``, ``0,1,2`` or ``GPU-…,GPU-…`` (a JSON array works too). The value
    is kept as "all" or a list of strings (indexes as their digits), so one rule reads it."""

    expected = ('"all", a list of GPU indexes (0,1,...) or a list of GPU UUIDs (GPU-...), '
                'without repeats')

    def from_env(self, text: str) -> Any:
        text = text.strip()
        if text.startswith("["):
            try:
                return self.check(json.loads(text))
            except json.JSONDecodeError:
                raise self.fail() from None
        if text.lower() == "all":
            return "all"
        return self.check([part.strip() for part in text.split(",") if part.strip()])

    def check(self, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "all":
            return "all"
        if not isinstance(value, list) or not value:
            raise self.fail()
        items = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise self.fail()
            items.append(str(item).strip())
        indexes = all(i.isdigit() for i in items)
        uuids = all(i.upper().startswith(("GPU-", "MIG-")) for i in items)
        if not (indexes or uuids) or len(set(items)) != len(items):
            raise self.fail()
        return items

    def to_toml(self, value: Any) -> str:
        if value == "all":
            return '"all"'
        return "[" + ", ".join(v if v.isdigit() else json.dumps(v) for v in value) + "]"
