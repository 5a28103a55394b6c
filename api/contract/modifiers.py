"""Modifiers: named workflow templates plus bindings from request keys to graph inputs.

A modifier is data, not code. Each file in ``api/contract/workflows/`` (and in the operator's folder from
the ``api.modifiers_dir`` setting) holds::

    {"name": "Text2Image", "description": "...",
     "workflow": { <ComfyUI API-format graph> },
     "bindings": {"width": {"targets": [["5", "width"]], "type": "integer", "minimum": 16,
                            "maximum": "api.max_dimension", "multiple_of": 8,
                            "default": 512, "aliases": ["w"], "random": false, "required": false,
                            "description": "Image width in pixels"}}}

Binding types: ``string``, ``integer``, ``number``, ``boolean``, ``image`` (an http(s) URL, a data
URI or base64 — the wrapper uploads it to ComfyUI and binds the name ComfyUI returns) and
``choice`` (with ``"choices": [...]``). ``"random": true`` makes a missing value, or -1, a fresh
random integer (seeds). A ``maximum`` or ``minimum`` given as a string names a setting.
An integer may arrive as ``512.0`` (JSON does not tell the two apart); it is bound as ``512``.

The same declarations give each modifier's schema in the API document (``api.contract.schemas``).
"""

from __future__ import annotations

import copy
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).with_name("workflows")
RANDOM_PLACEHOLDER = "__RANDOM_INT__"
RANDOM_MAX = 2**32 - 1
_TYPES = {"string", "integer", "number", "boolean", "image", "choice"}


class ModifierFileError(Exception):
    """A modifier file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Binding:
    key: str
    targets: tuple[tuple[str, str], ...]
    type: str
    default: Any = None
    minimum: float | str | None = None
    maximum: float | str | None = None
    multiple_of: int | None = None
    choices: tuple[Any, ...] = ()
    aliases: tuple[str, ...] = ()
    random: bool = False
    required: bool = False
    description: str = ""


@dataclass(frozen=True)
class Modifier:
    name: str
    description: str
    workflow: dict[str, Any]
    bindings: dict[str, Binding]
    source: Path

    def key_for(self, given: str) -> str | None:
        if given in self.bindings:
            return given
        for binding in self.bindings.values():
            if given in binding.aliases:
                return binding.key
        return None


@dataclass
class Applied:
    """A graph ready for ComfyUI, plus the image inputs still to upload (node, input, value)."""

    graph: dict[str, Any]
    images: list[tuple[str, str, str]] = field(default_factory=list)


def _load_file(path: Path) -> Modifier:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModifierFileError(f"{path}: cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModifierFileError(f"{path}: expected a JSON object")
    name = data.get("name") or path.stem
    workflow = data.get("workflow")
    if not isinstance(workflow, dict) or not workflow:
        raise ModifierFileError(f"{path}: 'workflow' must be a non-empty API-format graph")
    bindings: dict[str, Binding] = {}
    for key, spec in (data.get("bindings") or {}).items():
        if not isinstance(spec, dict):
            raise ModifierFileError(f"{path}: binding '{key}' must be an object")
        kind = spec.get("type", "string")
        if kind not in _TYPES:
            raise ModifierFileError(f"{path}: binding '{key}' has unknown type '{kind}'")
        targets = spec.get("targets")
        if not targets and "node" in spec:
            targets = [[spec["node"], spec.get("input", key)]]
        if not targets:
            raise ModifierFileError(f"{path}: binding '{key}' has no targets")
        checked = []
        for target in targets:
            if not (isinstance(target, list) and len(target) == 2):
                raise ModifierFileError(f"{path}: binding '{key}': a target is [node id, input name]")
            node_id, input_name = str(target[0]), str(target[1])
            if node_id not in workflow:
                raise ModifierFileError(f"{path}: binding '{key}' targets node {node_id}, "
                                        "which is not in the workflow")
            checked.append((node_id, input_name))
        bindings[key] = Binding(
            key=key, targets=tuple(checked), type=kind, default=spec.get("default"),
            minimum=spec.get("minimum"), maximum=spec.get("maximum"),
            multiple_of=spec.get("multiple_of"), choices=tuple(spec.get("choices", ())),
            aliases=tuple(spec.get("aliases", ())), random=bool(spec.get("random", False)),
            required=bool(spec.get("required", False)),
            description=str(spec.get("description", "")))
    return Modifier(name=name, description=str(data.get("description", "")), workflow=workflow,
                    bindings=bindings, source=path)


class ModifierRegistry:
    """All modifiers by name: the built-in files, then the operator's folder (which may override)."""

    def __init__(self, folders: list[Path], limit: Callable[[str], Any] | None = None):
        self._folders = folders
        self._limit = limit or (lambda name: None)
        self.modifiers: dict[str, Modifier] = {}
        self.reload()

    def reload(self) -> None:
        found: dict[str, Modifier] = {}
        for folder in self._folders:
            if not folder.is_dir():
                logger.warning("modifier folder %s does not exist; skipped", folder)
                continue
            for path in sorted(folder.glob("*.json")):
                try:
                    modifier = _load_file(path)
                except ModifierFileError as exc:
                    logger.error("modifier file skipped: %s", exc)
                    continue
                if modifier.name in found:
                    logger.info("modifier %s from %s replaces %s", modifier.name, path,
                                found[modifier.name].source)
                found[modifier.name] = modifier
        self.modifiers = found

    def names(self) -> list[str]:
        return sorted(self.modifiers)

    def get(self, name: str) -> Modifier | None:
        return self.modifiers.get(name)

    def bound(self, value: float | str | None) -> float | None:
        if isinstance(value, str):
            return self._limit(value)
        return value

    def apply(self, modifier: Modifier, modifications: dict[str, Any]
              ) -> tuple[Applied, dict[str, str]]:
        """The modifier's graph with the modifications applied, or the problems found."""
        problems: dict[str, str] = {}
        values: dict[str, Any] = {}
        for given, value in modifications.items():
            key = modifier.key_for(given)
            if key is None:
                known = ", ".join(sorted(modifier.bindings)) or "none"
                problems[f"input.modifications.{given}"] = (
                    f"unknown key for modifier {modifier.name} (known keys: {known})")
                continue
            if key in values:
                problems[f"input.modifications.{given}"] = f"given twice (also as '{key}' or an alias)"
                continue
            binding = modifier.bindings[key]
            if binding.type == "integer" and isinstance(value, float) and value.is_integer():
                value = int(value)
            error = self._check(binding, value)
            if error:
                problems[f"input.modifications.{given}"] = error
            values[key] = value
        for key, binding in modifier.bindings.items():
            if binding.required and key not in values and binding.default is None:
                problems[f"input.modifications.{key}"] = f"required by modifier {modifier.name}"
        if problems:
            return Applied({}), problems

        graph = copy.deepcopy(modifier.workflow)
        applied = Applied(graph)
        for key, binding in modifier.bindings.items():
            value = values.get(key, binding.default)
            if binding.random and (value is None or value == -1):
                value = random.randint(0, RANDOM_MAX)
            if value is None:
                continue
            for node_id, input_name in binding.targets:
                if binding.type == "image":
                    applied.images.append((node_id, input_name, value))
                graph[node_id].setdefault("inputs", {})[input_name] = value
        applied.graph = replace_random_ints(graph)
        return applied, []

    def _check(self, binding: Binding, value: Any) -> str | None:
        kind = binding.type
        if kind == "string":
            return None if isinstance(value, str) else "expected a string"
        if kind == "image":
            return None if isinstance(value, str) and value else \
                "expected an image: an http(s) URL, a data: URI or base64"
        if kind == "boolean":
            return None if isinstance(value, bool) else "expected true or false"
        if kind == "choice":
            # as JSON compares: true is not 1, and 1.0 is 1
            if any(value == choice and isinstance(value, bool) == isinstance(choice, bool)
                   for choice in binding.choices):
                return None
            return "expected one of " + ", ".join(json.dumps(c) for c in binding.choices)
        if kind == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                return "expected an integer"
        elif kind == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return "expected a number"
        if binding.random and value == -1:
            return None
        low, high = self.bound(binding.minimum), self.bound(binding.maximum)
        if low is not None and value < low:
            return f"{value} is below the minimum of {low}"
        if high is not None and value > high:
            return f"{value} is above the maximum of {high}"
        if binding.multiple_of and value % binding.multiple_of:
            return f"{value} is not a multiple of {binding.multiple_of}"
        return None


def registry_from_settings(settings: Any) -> ModifierRegistry:
    """The built-in modifiers plus the operator's folder (api.modifiers_dir), with bounds that
    name a setting read from `settings`. Reads files: call it off the event loop."""
    folders = [BUILTIN_DIR]
    if settings.api.modifiers_dir is not None:
        folders.append(Path(settings.api.modifiers_dir))
    return ModifierRegistry(folders, limit=lambda name: settings.get(name))


def replace_random_ints(value: Any) -> Any:
    """Replace every "__RANDOM_INT__" with a fresh random integer (each occurrence its own).

    A value that is exactly the placeholder becomes an int (seeds are integer inputs); a
    placeholder inside a longer string is replaced textually (e.g. filename prefixes).
    """
    if isinstance(value, str):
        if value == RANDOM_PLACEHOLDER:
            return random.randint(0, RANDOM_MAX)
        while RANDOM_PLACEHOLDER in value:
            value = value.replace(RANDOM_PLACEHOLDER, str(random.randint(0, RANDOM_MAX)), 1)
        return value
    if isinstance(value, dict):
        return {k: replace_random_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_random_ints(v) for v in value]
    return value
