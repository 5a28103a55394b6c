"""Reusing node results between prompts, as ComfyUI's default ("classic") cache does.

A node's key is its class, its IS_CHANGED value and its inputs, with each link replaced by the
upstream node's key; a later prompt reuses a result exactly when the key is equal. Only the
latest prompt's keys are kept.
"""

from __future__ import annotations

import logging
from typing import Any

from simulator.nodes import NodeEnv, SimNode
from simulator.validation import is_link

logger = logging.getLogger(__name__)


class _Uncacheable:
    """A signature part that equals nothing, not even itself (ComfyUI uses NaN)."""

    def __eq__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return id(self)


def _to_hashable(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, dict):
        return frozenset((_to_hashable(k), _to_hashable(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_to_hashable(v) for v in value)
    return _Uncacheable()


def compute_signatures(prompt: dict[str, Any], classes: dict[str, type[SimNode]], env: NodeEnv) -> dict[str, Any]:
    """A cache key per node: its class, IS_CHANGED value and inputs, with links replaced by the
    upstream node's key. Two runs share a node's result exactly when these keys are equal.

    Blocking (IS_CHANGED may hash a file): call through ``asyncio.to_thread``.
    """
    memo: dict[str, Any] = {}

    def key(node_id: str, visiting: frozenset[str]) -> Any:
        if node_id in memo:
            return memo[node_id]
        if node_id not in prompt or node_id in visiting:
            return _Uncacheable()
        node = prompt[node_id]
        cls = classes[node["class_type"]]
        changed: Any = None
        if cls.HAS_IS_CHANGED:
            constants = {k: v for k, v in node["inputs"].items() if not is_link(v)}
            try:
                changed = cls.is_changed(env, **constants)
            except Exception as ex:
                logger.warning("WARNING: %s", ex)
                changed = _Uncacheable()
        parts: list[Any] = [node["class_type"], changed]
        for name in sorted(node["inputs"]):
            value = node["inputs"][name]
            if is_link(value):
                parts.append((name, ("ANCESTOR", key(value[0], visiting | {node_id}), value[1])))
            else:
                parts.append((name, _to_hashable(value)))
        memo[node_id] = tuple(parts)
        return memo[node_id]

    return {node_id: key(node_id, frozenset()) for node_id in prompt}


class OutputCache:
    """Node outputs and UI results keyed by signature; holds only the latest prompt's nodes,
    like ComfyUI's default ("classic") cache."""

    def __init__(self) -> None:
        self._outputs: dict[Any, tuple[Any, ...]] = {}
        self._ui: dict[Any, dict[str, Any]] = {}
        self._keys: dict[str, Any] = {}

    def clear(self) -> None:
        self._outputs.clear()
        self._ui.clear()

    def set_prompt(self, keys: dict[str, Any]) -> None:
        self._keys = keys
        used = set()
        for value in keys.values():
            try:
                used.add(value)
            except TypeError:
                pass
        for store in (self._outputs, self._ui):
            for stale in [k for k in store if k not in used]:
                del store[stale]

    def _key(self, node_id: str) -> Any:
        return self._keys.get(node_id)

    def output(self, node_id: str) -> tuple[Any, ...] | None:
        return self._outputs.get(self._key(node_id))

    def has_output(self, node_id: str) -> bool:
        return self.output(node_id) is not None

    def set_output(self, node_id: str, value: tuple[Any, ...]) -> None:
        self._outputs[self._key(node_id)] = value

    def ui(self, node_id: str) -> dict[str, Any] | None:
        return self._ui.get(self._key(node_id))

    def set_ui(self, node_id: str, value: dict[str, Any]) -> None:
        self._ui[self._key(node_id)] = value
