"""The manifest: which model files a node must have, where from, and what their digest is.

Entries come from `[[models.files]]` in worker.toml (or the `MODELS` environment variable, a JSON
array) and from a separate file named by `models.manifest`, whose entries are top-level
`[[models]]` tables. TOML cannot hold both a `[models]` settings table and a `[[models]]` list in
one file, hence the two spellings. Every problem names the entry and the field, so an operator
can find it in a long list.
"""

from __future__ import annotations

import enum
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from api.modelstore.errors import ManifestError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class When(str, enum.Enum):
    BEFORE_READY = "before_ready"   # the worker takes no work (and does not benchmark) until it is there
    BACKGROUND = "background"       # fetched after the worker is ready


_SCHEMES = ("http://", "https://", "s3://", "hf://")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KNOWN = {"url", "path", "sha256", "when", "auth_env", "auth_header", "endpoint_url", "region",
          "access_key_env", "secret_key_env"}


@dataclass(frozen=True)
class ModelEntry:
    url: str
    path: str                      # relative to ComfyUI's models folder, '/'-separated
    sha256: str | None = None
    when: When = When.BEFORE_READY
    auth_env: str = ""             # environment variable holding the header's value
    auth_header: str = "Authorization"
    endpoint_url: str = ""         # s3:// only: this entry's own endpoint
    region: str = ""
    access_key_env: str = ""       # s3:// only: variables holding this entry's own keys
    secret_key_env: str = ""
    origin: str = ""               # "models.files[2]" or "manifest.toml [[models]] #3"

    @property
    def name(self) -> str:
        """The file name without its extension: what progress lines call it."""
        return PurePosixPath(self.path).stem

    def destination(self, models_dir: Path) -> Path:
        return models_dir.joinpath(*PurePosixPath(self.path).parts)


def _text(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise ManifestError(f"{where}.{key}: expected a string, got {value!r}")
    return value.strip()


def parse_entry(table: dict[str, Any], where: str) -> ModelEntry:
    unknown = sorted(set(table) - _KNOWN)
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(_KNOWN))})")
    url = _text(table, "url", where)
    if not url:
        raise ManifestError(f"{where}.url: missing")
    if not url.lower().startswith(_SCHEMES):
        raise ManifestError(f"{where}.url: must start with http://, https://, s3:// or hf:// "
                            f"(got {url.split('://')[0] or url!r})")
    path = _text(table, "path", where)
    if not path:
        raise ManifestError(f"{where}.path: missing (a path under ComfyUI's models folder, "
                            "like checkpoints/model.safetensors)")
    pure = PurePosixPath(path.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or len(pure.parts) < 2:
        raise ManifestError(f"{where}.path: {path!r} must be relative to the models folder, "
                            "inside a subfolder (like checkpoints/x.safetensors), without '..'")
    sha = _text(table, "sha256", where).lower() or None
    if sha is not None and not _SHA256.match(sha):
        raise ManifestError(f"{where}.sha256: expected 64 hex digits, got {sha!r}")
    when_text = _text(table, "when", where) or When.BEFORE_READY.value
    try:
        when = When(when_text)
    except ValueError:
        raise ManifestError(f"{where}.when: expected before_ready or background, "
                            f"got {when_text!r}") from None
    entry = ModelEntry(url=url, path=str(pure), sha256=sha, when=when,
                       auth_env=_text(table, "auth_env", where),
                       auth_header=_text(table, "auth_header", where) or "Authorization",
                       endpoint_url=_text(table, "endpoint_url", where),
                       region=_text(table, "region", where),
                       access_key_env=_text(table, "access_key_env", where),
                       secret_key_env=_text(table, "secret_key_env", where), origin=where)
    for key in ("auth_env", "access_key_env", "secret_key_env"):
        value = getattr(entry, key)
        if value and not _ENV_NAME.match(value):
            raise ManifestError(f"{where}.{key}: {value!r} is not an environment variable name "
                                "(the manifest names the variable, never the secret itself)")
    if not url.lower().startswith("s3://") and (entry.endpoint_url or entry.access_key_env):
        raise ManifestError(f"{where}: endpoint_url and access_key_env apply to s3:// URLs only")
    return entry


def parse_entries(tables: list[dict[str, Any]], origin: str) -> list[ModelEntry]:
    """Entries from a list of tables; raises ManifestError naming the first bad one."""
    return _check_unique([parse_entry(table, f"{origin}[{index}]")
                          for index, table in enumerate(tables)])


def load_manifest_file(path: Path) -> list[ModelEntry]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} does not exist (models.manifest)") from None
    except OSError as exc:
        raise ManifestError(f"manifest {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"manifest {path} is not valid TOML: {exc}") from None
    tables = data.get("models", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ManifestError(f"manifest {path}: expected [[models]] tables")
    return parse_entries(tables, f"{path} models")


def load_manifest(settings: Any, manifest_path: Path | None = None) -> list[ModelEntry]:
    """The node's manifest: `models.files` plus the entries of `models.manifest` (or the given file)."""
    entries = parse_entries(settings.models.files, "models.files")
    path = manifest_path or settings.models.manifest
    if path:
        entries += load_manifest_file(Path(path))
    return _check_unique(entries)


def _check_unique(entries: list[ModelEntry]) -> list[ModelEntry]:
    seen: dict[str, str] = {}
    for entry in entries:
        if entry.path in seen:
            raise ManifestError(f"{entry.origin}.path: {entry.path} is also the path of "
                                f"{seen[entry.path]}")
        seen[entry.path] = entry.origin
    return entries
