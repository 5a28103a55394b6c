"""The server's feature flags: the ``feature_flags`` WebSocket answer and ``GET /features``.

0.3.64 announces two flags. The newest ComfyUI announces more, says whether the assets system
is on, and takes extra flags from ``--feature-flag KEY[=VALUE]`` (values of flags it knows are
coerced to their type; extras never replace the core flags). ``--list-feature-flags`` prints
the flags it knows, with their types and defaults.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from simulator.api_version import ApiVersion

logger = logging.getLogger(__name__)

# The flags the newest ComfyUI lets a launcher set, with their types and defaults (the
# descriptions are the simulator's own words).
CLI_FEATURE_FLAGS: dict[str, dict[str, Any]] = {
    "show_signin_button": {"type": "bool", "default": False,
                           "description": "The frontend shows its sign-in button even when nobody is signed in."},
    "enable_telemetry": {"type": "bool", "default": False,
                         "description": "Tells the frontend that telemetry is collected."},
    "partner_run_gate_enabled": {"type": "bool", "default": True,
                                 "description": "Running a graph with partner (paid API) nodes asks for a sign-in."},
}


def _to_bool(raw: str) -> bool:
    if raw.lower() == "true":
        return True
    if raw.lower() == "false":
        return False
    raise ValueError(f"expected 'true' or 'false', got {raw!r}")


_COERCE: dict[str, Callable[[str], Any]] = {"bool": _to_bool, "int": int, "float": float}


def parse_cli_feature_flags(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` or bare ``KEY`` (true); a known flag whose value does not fit its type is
    dropped with a warning, an unknown one keeps its value as a string."""
    flags: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not key:
            continue
        raw = raw.strip() if sep else "true"
        kind = CLI_FEATURE_FLAGS.get(key, {}).get("type")
        coerce = _COERCE.get(kind) if kind else None
        try:
            flags[key] = coerce(raw) if coerce else raw
        except (TypeError, ValueError) as ex:
            logger.warning("Could not coerce --feature-flag %s=%r to %s (%s); dropping flag.", key, raw, kind, ex)
    return flags


def server_features(version: ApiVersion, max_upload_size_mb: float, assets_enabled: bool,
                    cli_flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """What this server announces."""
    size = max_upload_size_mb * 1024 * 1024
    if not version.is_newer:
        return {"supports_preview_metadata": True, "max_upload_size": int(size) if size == int(size) else size}
    core: dict[str, Any] = {
        "supports_preview_metadata": True,
        "supports_model_type_tags": True,
        "max_upload_size": size,  # not rounded: a float when --max-upload-size was given
        "extension": {"manager": {"supports_v4": True}},
        "node_replacements": True,
        "assets": assets_enabled,
    }
    extras = {k: v for k, v in (cli_flags or {}).items() if k not in core}
    return {**core, **extras}
