"""ComfyUI's prompt queue: pending prompts in a heap, the running one, and the history."""

from __future__ import annotations

import asyncio
import copy
import heapq
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

MAXIMUM_HISTORY_SIZE = 10000
# extra_data keys ComfyUI strips before a prompt goes into history.
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


class QueueItem(NamedTuple):
    """ComfyUI's queue entry; it is a tuple so it sorts in the heap and encodes as a JSON list."""

    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]


@dataclass(frozen=True)
class ExecutionStatus:
    status_str: str  # "success" | "error"
    completed: bool
    messages: list[tuple[str, dict[str, Any]]]

    def to_json(self) -> dict[str, Any]:
        return {"status_str": self.status_str, "completed": self.completed,
                "messages": copy.deepcopy(self.messages)}


class PromptQueue:
    """Pending prompts (a heap ordered by number), the running one, and the history."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._pending: list[QueueItem] = []
        self._running: dict[int, QueueItem] = {}
        self._history: dict[str, dict[str, Any]] = {}
        self._flags: dict[str, Any] = {}
        self._task_counter = 0
        self._wakeup = asyncio.Event()

    def put(self, item: QueueItem) -> None:
        heapq.heappush(self._pending, item)
        self._on_change()
        self._wakeup.set()

    async def get(self) -> tuple[QueueItem, int] | None:
        """The next prompt, or None when only flags (``POST /free``) woke the worker."""
        while not self._pending:
            self._wakeup.clear()
            if self._flags:
                return None
            await self._wakeup.wait()
        item = heapq.heappop(self._pending)
        task_id = self._task_counter
        self._running[task_id] = copy.deepcopy(item)
        self._task_counter += 1
        self._on_change()
        return item, task_id

    def task_done(self, task_id: int, history_result: dict[str, Any], status: ExecutionStatus | None) -> None:
        item = self._running.pop(task_id)
        if len(self._history) > MAXIMUM_HISTORY_SIZE:
            self._history.pop(next(iter(self._history)))
        for key in SENSITIVE_EXTRA_DATA_KEYS:
            item.extra_data.pop(key, None)
        entry: dict[str, Any] = {"prompt": item, "outputs": {},
                                 "status": status.to_json() if status is not None else None}
        entry.update(history_result)
        self._history[item.prompt_id] = entry
        self._on_change()

    def running(self) -> list[QueueItem]:
        return list(self._running.values())

    def pending(self) -> list[QueueItem]:
        """Pending items in heap order, as ComfyUI lists them (not necessarily sorted)."""
        return list(self._pending)

    def interrupt_if_running(self, prompt_id: str, interrupt: Callable[[], None]) -> bool:
        """Signal ``interrupt`` only if ``prompt_id`` is the prompt running now; True if it was.

        The check and the signal happen in one step (no await between them, as ComfyUI does
        them under its queue lock), so a prompt that just finished cannot hand the interrupt
        to the next one: the executor clears the flag when a prompt starts.
        """
        if any(item.prompt_id == prompt_id for item in self._running.values()):
            interrupt()
            return True
        return False

    def is_busy(self) -> bool:
        return bool(self._running)

    def tasks_remaining(self) -> int:
        return len(self._pending) + len(self._running)

    def wipe_queue(self) -> None:
        self._pending = []
        self._on_change()

    def delete_queue_item(self, prompt_id: str) -> bool:
        for index, item in enumerate(self._pending):
            if item.prompt_id == prompt_id:
                if len(self._pending) == 1:
                    self.wipe_queue()
                else:
                    self._pending.pop(index)
                    heapq.heapify(self._pending)
                self._on_change()
                return True
        return False

    def get_history(self, prompt_id: str | None = None, max_items: int | None = None,
                    offset: int = -1) -> dict[str, Any]:
        if prompt_id is not None:
            if prompt_id in self._history:
                return {prompt_id: copy.deepcopy(self._history[prompt_id])}
            return {}
        out: dict[str, Any] = {}
        if offset < 0 and max_items is not None:
            offset = len(self._history) - max_items
        for index, key in enumerate(self._history):
            if index >= offset:
                out[key] = self._history[key]
                if max_items is not None and len(out) >= max_items:
                    break
        return out

    def wipe_history(self) -> None:
        self._history = {}

    def delete_history_item(self, prompt_id: str) -> None:
        self._history.pop(prompt_id, None)

    def set_flag(self, name: str, value: Any) -> None:
        self._flags[name] = value
        self._wakeup.set()

    def take_flags(self) -> dict[str, Any]:
        flags, self._flags = self._flags, {}
        return flags
