"""Resolve the effective settings: defaults, then the TOML file, then the environment.

Every value remembers where it came from, so `config show` can say it and a bad value can be
reported as "worker.port: 'abc' from environment variable WORKER_PORT: expected an integer ...".
All problems are collected and raised together as one `SettingsError`.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from config.settings import BY_NAME, SECTION_DOCS, SETTINGS, Setting
from config.types import InvalidValue

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/comfy-worker/worker.toml")
CONFIG_PATH_ENV = "COMFY_WORKER_CONFIG"
MASK = "********"


class SettingsError(Exception):
    """Settings that cannot be used. The message lists every problem, one a line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Source:
    kind: str  # "default" | "file" | "env"
    detail: str = ""

    def __str__(self) -> str:
        if self.kind == "default":
            return "default"
        if self.kind == "env":
            return f"environment variable {self.detail}"
        return self.detail


class _Section:
    """Attribute access to one section's values: ``settings.worker.port``."""

    def __init__(self, name: str, values: dict[str, Any]):
        self._name = name
        self._values = values

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"no setting {self._name}.{key}") from None


class Settings:
    """The effective settings and the source of each value."""

    def __init__(self, values: dict[str, Any], sources: dict[str, Source],
                 config_path: Path | None):
        self._values = values
        self._sources = sources
        self.config_path = config_path
        sections: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            section, key = name.split(".", 1)
            sections.setdefault(section, {})[key] = value
        for section, section_values in sections.items():
            setattr(self, section, _Section(section, section_values))

    def get(self, name: str) -> Any:
        return self._values[name]

    def source(self, name: str) -> Source:
        return self._sources[name]

    def items(self) -> Iterator[tuple[Setting, Any, Source]]:
        for setting in SETTINGS:
            yield setting, self._values[setting.name], self._sources[setting.name]

    def with_overrides(self, **overrides: Any) -> "Settings":
        """A copy with some values replaced (dotted names with '__' for '.'), for tests."""
        values = dict(self._values)
        sources = dict(self._sources)
        for raw_name, value in overrides.items():
            name = raw_name.replace("__", ".")
            if name not in values:
                raise KeyError(name)
            values[name] = value
            sources[name] = Source("override")
        return Settings(values, sources, self.config_path)

    def secrets(self) -> list[str]:
        """Non-empty secret values, for masking them wherever text leaves the process."""
        return [str(self._values[s.name]) for s in SETTINGS if s.secret and self._values[s.name]]

    def public_view(self) -> list[dict[str, Any]]:
        """Every setting with its value (secrets masked) and source, for `config show`."""
        rows = []
        for setting, value, source in self.items():
            shown = MASK if setting.secret and value else _plain(value)
            rows.append({"name": setting.name, "value": shown, "source": str(source),
                         "env": setting.env[0] if setting.env else "", "doc": setting.doc})
        return rows


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    return value


def _key_line(text: str, section: str, key: str) -> int | None:
    """The line number of ``key = ...`` inside ``[section]``; tomllib keeps no positions."""
    current = ""
    key_re = re.compile(r"^\s*(?:\"%s\"|'%s'|%s)\s*=" % ((re.escape(key),) * 3))
    for number, line in enumerate(text.splitlines(), start=1):
        header = re.match(r"^\s*\[([^\[\]]+)\]\s*(#.*)?$", line)
        if header:
            current = header.group(1).strip()
            continue
        if current == section and key_re.match(line):
            return number
    return None


def resolve_config_path(explicit: str | os.PathLike[str] | None,
                        environ: Mapping[str, str]) -> Path | None:
    """The file to read: --config, else $COMFY_WORKER_CONFIG, else the default path if present."""
    if explicit:
        return Path(explicit)
    from_env = environ.get(CONFIG_PATH_ENV)
    if from_env:
        return Path(from_env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def read_file(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError([f"config file {path} does not exist"]) from None
    except OSError as exc:
        raise SettingsError([f"config file {path} cannot be read: {exc.strerror}"]) from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError([f"config file {path} is not valid TOML: {exc}"]) from None


def _file_values(path: Path, problems: list[str]) -> dict[str, tuple[Any, Source]]:
    data, text = read_file(path)
    found: dict[str, tuple[Any, Source]] = {}
    sections = sorted({s.section for s in SETTINGS})
    for section, table in data.items():
        if not isinstance(table, dict):
            hint = difflib.get_close_matches(section, sections, n=1)
            problems.append(f"{path}: '{section}' is not a section"
                            + (f"; did you mean [{hint[0]}]?" if hint else ""))
            continue
        if section not in sections:
            hint = difflib.get_close_matches(section, sections, n=1)
            problems.append(f"{path}: unknown section [{section}]"
                            + (f"; did you mean [{hint[0]}]?" if hint else ""))
            continue
        keys = [s.key for s in SETTINGS if s.section == section]
        for key, value in table.items():
            name = f"{section}.{key}"
            line = _key_line(text, section, key)
            where = f"{path} line {line}" if line else str(path)
            if name not in BY_NAME:
                hint = difflib.get_close_matches(key, keys, n=1)
                problems.append(f"{name}: unknown setting in {where}"
                                + (f"; did you mean {section}.{hint[0]}?" if hint else ""))
                continue
            found[name] = (value, Source("file", where))
    return found


def _describe(value: Any, secret: bool) -> str:
    if secret:
        return "the value"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_settings(config_path: str | os.PathLike[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults < file < environment. Raises SettingsError naming every bad key and its source."""
    environ = os.environ if environ is None else environ
    path = resolve_config_path(config_path, environ)
    problems: list[str] = []
    from_file = _file_values(path, problems) if path else {}

    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for setting in SETTINGS:
        value = setting.type.check(setting.default)
        raw: Any = setting.default
        source = Source("default")
        try:
            if setting.name in from_file:
                raw, source = from_file[setting.name]
                value = setting.type.from_toml(raw)
            for env_name in setting.env:
                if env_name in environ:
                    raw = environ[env_name]
                    source = Source("env", env_name)
                    value = setting.type.from_env(raw)
                    break
        except InvalidValue as exc:
            problems.append(f"{setting.name}: {_describe(raw, setting.secret)} from {source}: {exc}")
            continue
        values[setting.name] = value
        sources[setting.name] = source

    if not problems:
        problems.extend(_cross_checks(values, sources))
    if problems:
        raise SettingsError(problems)
    return Settings(values, sources, path)


def _cross_checks(values: dict[str, Any], sources: dict[str, Source]) -> list[str]:
    """Rules that involve more than one setting."""
    problems = []
    # Behind the autoscaler an empty worker.ssl_cert/ssl_key means the instance certificate
    # (autoscaler.instance_cert/instance_key), as Vast's start script sets USE_SSL up.
    if values["worker.use_ssl"] and not values["autoscaler.report_addr"]:
        for name in ("worker.ssl_cert", "worker.ssl_key"):
            if values[name] is None:
                problems.append(f"{name}: required when worker.use_ssl is true "
                                f"(use_ssl from {sources['worker.use_ssl']}) and the worker is "
                                "not behind the autoscaler (REPORT_ADDR unset)")
    if values["supervisor.backoff_initial"] > values["supervisor.backoff_max"]:
        problems.append("supervisor.backoff_initial: larger than supervisor.backoff_max "
                        f"(from {sources['supervisor.backoff_initial']})")
    if values["metrics.port"] and not values["metrics.token"] and not \
            values["metrics.unsecured"] and not _loopback(values["metrics.host"]):
        problems.append(
            f"metrics.host: {values['metrics.host']!r} (from {sources['metrics.host']}) is not a "
            "loopback address, so anyone who reaches it would read GPU serials and fleet "
            "internals: set metrics.token (METRICS_TOKEN) for Prometheus to send as a bearer "
            "token, or metrics.unsecured = true (METRICS_UNSECURED) on a private network")
    if not values["comfyui.command"]:
        problems.append(f"comfyui.command: empty (from {sources['comfyui.command']}): "
                        "expected the command that starts ComfyUI")
    return problems


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_file(path: str | os.PathLike[str]) -> Settings:
    """Validate one file on its own (the environment is ignored)."""
    return load_settings(path, environ={})


def render_example() -> str:
    """The documented example file, generated from the declarations."""
    lines = [
        "# comfy-worker settings: every key, with its default.",
        "# Precedence: defaults < this file < environment variables < request fields (s3, webhook).",
        "# Default location: /etc/comfy-worker/worker.toml (or --config PATH, or $COMFY_WORKER_CONFIG).",
        "# Generated from config/settings.py by `comfy-worker config example`; a test keeps it in sync.",
    ]
    section = None
    for setting in SETTINGS:
        if setting.section != section:
            section = setting.section
            lines += ["", f"[{section}]", f"# {SECTION_DOCS[section]}"]
        env = ", ".join(setting.env)
        lines.append(f"# {setting.doc}" + (f"  (env: {env})" if env else ""))
        lines.append(f"# type: {setting.type.expected}")
        lines.append(f"{setting.key} = {setting.type.to_toml(setting.default)}")
    return "\n".join(lines) + "\n"


def render_settings_docs() -> str:
    """docs/settings.md: every setting as one table per section, generated from the declarations."""
    sections = list(dict.fromkeys(setting.section for setting in SETTINGS))

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "# Settings",
        "",
        "**Who it is for:** operators writing `worker.toml` or a worker's environment, and anyone "
        "looking up what a setting does. It lists every setting comfy-worker reads, one table per "
        "TOML section: the key, the environment variables that set it (the first is the canonical "
        "one, later ones are aliases), its type, its default and what it does.",
        "",
        "<!-- Generated from config/settings.py by `comfy-worker config docs > docs/settings.md`; "
        "a test fails when it drifts. Do not edit by hand. -->",
        "",
        "Where the file is found, the precedence (default < file < environment < request "
        "fields) and the `comfy-worker config` commands: [operations](operations.md#settings).",
        "",
        "Sections: " + ", ".join(f"[`[{name}]`](#{name})" for name in sections) + ".",
    ]
    section = None
    for setting in SETTINGS:
        if setting.section != section:
            section = setting.section
            lines += ["", f"## [{section}]", "", SECTION_DOCS[section], "",
                      "| key | environment | type | default | what it does |",
                      "|---|---|---|---|---|"]
        env = ", ".join(f"`{name}`" for name in setting.env) or "—"
        default = setting.type.to_toml(setting.default)
        secret = " Secret: masked in `config show`, logs and errors." if setting.secret else ""
        doc = setting.doc + secret
        lines.append(f"| `{setting.name}` | {env} | {cell(setting.type.expected)} | "
                     f"`{cell(default)}` | {cell(doc)} |")
    return "\n".join(lines) + "\n"
