"""Running prompts: the FIFO queue, the executor, the output cache and the progress events.

The order and content of WebSocket events follows ComfyUI 0.3.64's ``PromptExecutor`` and
``prompt_worker``:

    execution_start, execution_cached,
    per node: progress_state (running), executing, [progress_state + progress per step],
              [executed when the node has UI output], progress_state (finished)
    execution_success | execution_error | execution_interrupted,
    (history written) status (broadcast), executing {node: null}

Events go to the prompt's ``client_id`` only; without one, ComfyUI still broadcasts
``progress_state``, ``progress`` and ``execution_interrupted`` and nothing else, and so does
this simulator.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import heapq
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol

from simulator.errors import InterruptProcessing
from simulator.knobs import HangMode
from simulator.nodes import NODE_CLASSES, NodeEnv, NodeOutput, SimNode
from simulator.validation import full_type_name, input_info, is_link

logger = logging.getLogger(__name__)

MAXIMUM_HISTORY_SIZE = 10000
# extra_data keys ComfyUI strips before a prompt goes into history.
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


class EventSink(Protocol):
    def send_sync(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        """Queue an event for the sockets of ``sid`` (all sockets when None)."""

    async def drain(self) -> None:
        """Wait until every queued event has been written to the sockets."""


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


class InterruptFlag:
    """ComfyUI's global "interrupt processing" switch: set by /interrupt, consumed when checked."""

    def __init__(self) -> None:
        self._set = False

    def set(self, value: bool = True) -> None:
        self._set = value

    def raise_if_set(self) -> None:
        if self._set:
            self._set = False
            raise InterruptProcessing()


class NodeState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"


class ProgressRegistry:
    """Per-node progress of one prompt; every change sends a ``progress_state`` event."""

    def __init__(self, prompt_id: str, send: Callable[[str, dict[str, Any]], None]) -> None:
        self.prompt_id = prompt_id
        self._send = send
        self._nodes: dict[str, dict[str, Any]] = {}

    def _entry(self, node_id: str) -> dict[str, Any]:
        return self._nodes.setdefault(node_id, {"state": NodeState.PENDING, "value": 0, "max": 1})

    def start(self, node_id: str) -> None:
        self._entry(node_id).update(state=NodeState.RUNNING, value=0.0, max=1.0)
        self._publish()

    def update(self, node_id: str, value: float, max_value: float) -> None:
        self._entry(node_id).update(state=NodeState.RUNNING, value=value, max=max_value)
        self._publish()

    def finish(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(state=NodeState.FINISHED, value=entry["max"])
        self._publish()

    def _publish(self) -> None:
        nodes = {
            node_id: {"value": e["value"], "max": e["max"], "state": e["state"].value, "node_id": node_id,
                      "prompt_id": self.prompt_id, "display_node_id": node_id, "parent_node_id": None,
                      "real_node_id": node_id}
            for node_id, e in self._nodes.items() if e["state"] is not NodeState.PENDING
        }
        self._send("progress_state", {"prompt_id": self.prompt_id, "nodes": nodes})


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


class DependencyCycleError(Exception):
    pass


class ExecutionList:
    """ComfyUI's topological "dissolve": nodes become ready when their inputs are done; among
    ready nodes, output nodes and nodes feeding them (within two hops) go first."""

    def __init__(self, prompt: dict[str, Any], classes: dict[str, type[SimNode]],
                 is_cached: Callable[[str], bool]) -> None:
        self._prompt = prompt
        self._classes = classes
        self._is_cached = is_cached
        self._pending: dict[str, bool] = {}
        self._block_count: dict[str, int] = {}
        self._blocking: dict[str, dict[str, dict[int, bool]]] = {}

    def add_node(self, node_id: str) -> None:
        stack = [node_id]
        links: list[tuple[str, int, str]] = []
        while stack:
            unique_id = stack.pop()
            if unique_id in self._pending:
                continue
            self._pending[unique_id] = True
            self._block_count[unique_id] = 0
            self._blocking[unique_id] = {}
            for value in self._prompt[unique_id]["inputs"].values():
                if is_link(value) and not self._is_cached(value[0]):
                    stack.append(value[0])
                    links.append((value[0], value[1], unique_id))
        for from_id, socket, to_id in links:
            self._add_link(from_id, socket, to_id)

    def _add_link(self, from_id: str, socket: int, to_id: str) -> None:
        if self._is_cached(from_id):
            return
        self.add_node(from_id)
        if to_id not in self._blocking[from_id]:
            self._blocking[from_id][to_id] = {}
            self._block_count[to_id] += 1
        self._blocking[from_id][to_id][socket] = True

    def is_empty(self) -> bool:
        return not self._pending

    def next_node(self) -> str:
        ready = [n for n in self._pending if self._block_count[n] == 0]
        if not ready:
            raise DependencyCycleError("Dependency cycle detected")
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(b) for b in self._blocking[node_id]):
                return node_id
        for node_id in ready:
            for b in self._blocking[node_id]:
                if any(self._is_output(b1) for b1 in self._blocking[b]):
                    return node_id
        return ready[0]

    def complete(self, node_id: str) -> None:
        del self._pending[node_id]
        for blocked in self._blocking[node_id]:
            self._block_count[blocked] -= 1
        del self._blocking[node_id]

    def _is_output(self, node_id: str) -> bool:
        return self._classes[self._prompt[node_id]["class_type"]].OUTPUT_NODE


class FaultInjector:
    """Fires the ``crash_during_prompt`` / ``hang_during_prompt`` knobs once per prompt, at the
    first of: a sampler past half its steps, an output node starting, the prompt's end.

    Queued events are flushed first, so a client has seen the prompt start before it dies.
    """

    def __init__(self, env: NodeEnv, sink: EventSink) -> None:
        self._env = env
        self._sink = sink
        self._armed = False

    def arm(self) -> None:
        self._armed = True

    async def checkpoint(self, where: str) -> None:
        knobs = self._env.knobs
        if not self._armed or (knobs.crash_during_prompt is None and knobs.hang_during_prompt is None):
            return
        self._armed = False
        await self._sink.drain()
        if knobs.crash_during_prompt is not None:
            logger.error("Simulated crash during prompt (%s): %s", where, knobs.crash_during_prompt.describe())
            knobs.crash_during_prompt.trigger()
        mode = knobs.hang_during_prompt
        logger.error("Simulated hang during prompt (%s): %s", where, mode.value if mode else "")
        for handler in logging.getLogger().handlers:
            handler.flush()
        if mode is HangMode.SIGSTOP:
            os.kill(os.getpid(), signal.SIGSTOP)
            return  # resumed by SIGCONT: carry on as if nothing happened
        while True:  # HangMode.BLOCK: hold the event loop so nothing answers
            time.sleep(3600)


class ExecutionResult(enum.Enum):
    SUCCESS = 0
    FAILURE = 1


@dataclass
class ExecutionOutcome:
    success: bool
    history_result: dict[str, Any]
    messages: list[tuple[str, dict[str, Any]]]


class _RunContext:
    """What a running node sees (see ``simulator.nodes.RunContext``)."""

    def __init__(self, executor: "PromptExecutor", prompt_id: str, node_id: str,
                 progress: ProgressRegistry) -> None:
        self.env = executor.env
        self.prompt_id = prompt_id
        self.node_id = node_id
        self._executor = executor
        self._progress = progress

    async def progress(self, value: int, total: int) -> None:
        # Same order as ComfyUI's progress hook: interrupt check, progress_state, progress.
        self._executor.interrupt.raise_if_set()
        self._progress.update(self.node_id, value, total)
        self._executor.sink.send_sync("progress", {"value": value, "max": total, "prompt_id": self.prompt_id,
                                                   "node": self.node_id}, self._executor.client_id)
        if value * 2 >= total:
            await self._executor.faults.checkpoint(f"node {self.node_id} step {value}/{total}")


class PromptExecutor:
    """Executes one prompt at a time and reports it as ComfyUI does."""

    def __init__(self, env: NodeEnv, sink: EventSink, classes: dict[str, type[SimNode]] | None = None,
                 cache_enabled: bool = True) -> None:
        self.env = env
        self.sink = sink
        self.classes = classes if classes is not None else NODE_CLASSES
        self.cache_enabled = cache_enabled
        self.cache = OutputCache()
        self.interrupt = InterruptFlag()
        self.faults = FaultInjector(env, sink)
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self._messages: list[tuple[str, dict[str, Any]]] = []

    def reset_caches(self) -> None:
        self.cache.clear()

    def _add_message(self, event: str, data: dict[str, Any], broadcast: bool) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        self._messages.append((event, data))
        if self.client_id is not None or broadcast:
            self.sink.send_sync(event, data, self.client_id)

    async def execute(self, prompt: dict[str, Any], prompt_id: str, extra_data: dict[str, Any],
                      execute_outputs: list[str]) -> ExecutionOutcome:
        self.interrupt.set(False)
        self.client_id = extra_data.get("client_id")
        self._messages = []
        self._add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)

        progress = ProgressRegistry(prompt_id, lambda e, d: self.sink.send_sync(e, d, self.client_id))
        keys = await asyncio.to_thread(compute_signatures, prompt, self.classes, self.env)
        if not self.cache_enabled:
            self.cache.clear()
        self.cache.set_prompt(keys)
        cached_nodes = [node_id for node_id in prompt if self.cache.has_output(node_id)]
        self._add_message("execution_cached", {"nodes": cached_nodes, "prompt_id": prompt_id}, broadcast=False)

        executed: set[str] = set()
        current_outputs = list(prompt)
        execution_list = ExecutionList(prompt, self.classes, self.cache.has_output)
        for node_id in execute_outputs:
            execution_list.add_node(node_id)
        self.faults.arm()
        success = True
        while not execution_list.is_empty():
            try:
                node_id = execution_list.next_node()
            except DependencyCycleError as ex:
                blamed = next(iter(prompt))
                self._handle_error(prompt_id, prompt, current_outputs, executed, {
                    "node_id": blamed, "exception_message": str(ex),
                    "exception_type": "graph.DependencyCycleError", "traceback": [], "current_inputs": []}, ex)
                success = False
                break
            result, error, ex = await self._execute_node(prompt, prompt_id, node_id, extra_data, executed, progress)
            success = result is not ExecutionResult.FAILURE
            if result is ExecutionResult.FAILURE:
                self._handle_error(prompt_id, prompt, current_outputs, executed, error, ex)
                break
            execution_list.complete(node_id)
        else:
            await self.faults.checkpoint("end of prompt")
            self._add_message("execution_success", {"prompt_id": prompt_id}, broadcast=False)

        ui_outputs: dict[str, Any] = {}
        meta_outputs: dict[str, Any] = {}
        for node_id in prompt:
            ui_info = self.cache.ui(node_id)
            if ui_info is not None:
                ui_outputs[node_id] = ui_info["output"]
                meta_outputs[node_id] = ui_info["meta"]
        self.last_node_id = None
        return ExecutionOutcome(success, {"outputs": ui_outputs, "meta": meta_outputs}, list(self._messages))

    async def _execute_node(self, prompt: dict[str, Any], prompt_id: str, node_id: str,
                            extra_data: dict[str, Any], executed: set[str],
                            progress: ProgressRegistry) -> tuple[ExecutionResult, dict[str, Any] | None,
                                                                 BaseException | None]:
        node = prompt[node_id]
        class_type = node["class_type"]
        cls = self.classes[class_type]
        if self.cache.has_output(node_id):
            if self.client_id is not None:
                cached_ui = self.cache.ui(node_id) or {}
                self.sink.send_sync("executed", {"node": node_id, "display_node": node_id,
                                                 "output": cached_ui.get("output"), "prompt_id": prompt_id},
                                    self.client_id)
            progress.finish(node_id)
            return ExecutionResult.SUCCESS, None, None

        inputs: dict[str, Any] | None = None
        try:
            progress.start(node_id)
            inputs = self._gather_inputs(node, cls, prompt, extra_data)
            if self.client_id is not None:
                self.last_node_id = node_id
                self.sink.send_sync("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id},
                                    self.client_id)
            self.interrupt.raise_if_set()
            if cls.OUTPUT_NODE:
                await self.faults.checkpoint(f"output node {node_id} started")
            if class_type in self.env.knobs.fail_node:
                raise RuntimeError(f"Simulated failure in {class_type} (fail_node knob)")
            result: NodeOutput = await cls().run(_RunContext(self, prompt_id, node_id, progress), **inputs)
            if result.ui:
                self.cache.set_ui(node_id, {
                    "meta": {"node_id": node_id, "display_node": node_id, "parent_node": None,
                             "real_node_id": node_id},
                    "output": result.ui,
                })
                if self.client_id is not None:
                    self.sink.send_sync("executed", {"node": node_id, "display_node": node_id, "output": result.ui,
                                                     "prompt_id": prompt_id}, self.client_id)
            self.cache.set_output(node_id, result.outputs)
        except InterruptProcessing as iex:
            logger.info("Processing interrupted")
            return ExecutionResult.FAILURE, {"node_id": node_id}, iex
        except Exception as ex:
            tb = sys.exc_info()[2]
            formatted: dict[str, Any] = {}
            if inputs is not None:
                formatted = {name: [_format_value(value)] for name, value in inputs.items()}
            logger.error("!!! Exception during processing !!! %s", ex)
            logger.error(traceback.format_exc())
            return ExecutionResult.FAILURE, {
                "node_id": node_id,
                # ComfyUI appends an (empty unless out-of-memory) tip after a newline.
                "exception_message": f"{ex}\n",
                "exception_type": full_type_name(type(ex)),
                "traceback": traceback.format_tb(tb),
                "current_inputs": formatted,
            }, ex
        progress.finish(node_id)
        executed.add(node_id)
        return ExecutionResult.SUCCESS, None, None

    def _gather_inputs(self, node: dict[str, Any], cls: type[SimNode], prompt: dict[str, Any],
                       extra_data: dict[str, Any]) -> dict[str, Any]:
        declared = cls.input_types(self.env)
        values: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            _, category, _ = input_info(declared, name)
            if is_link(value):
                upstream = self.cache.output(value[0])
                values[name] = upstream[value[1]] if upstream is not None and value[1] < len(upstream) else None
            elif category is not None:
                values[name] = value
        for name, kind in declared.get("hidden", {}).items():
            if kind == "PROMPT":
                values[name] = prompt
            elif kind == "EXTRA_PNGINFO":
                values[name] = extra_data.get("extra_pnginfo")
        return values

    def _handle_error(self, prompt_id: str, prompt: dict[str, Any], current_outputs: list[str],
                      executed: set[str], error: dict[str, Any] | None, ex: BaseException | None) -> None:
        assert error is not None
        node_id = error["node_id"]
        class_type = prompt[node_id]["class_type"]
        if isinstance(ex, InterruptProcessing):
            self._add_message("execution_interrupted", {"prompt_id": prompt_id, "node_id": node_id,
                                                        "node_type": class_type, "executed": list(executed)},
                              broadcast=True)
            return
        self._add_message("execution_error", {
            "prompt_id": prompt_id, "node_id": node_id, "node_type": class_type, "executed": list(executed),
            "exception_message": error["exception_message"], "exception_type": error["exception_type"],
            "traceback": error["traceback"], "current_inputs": error["current_inputs"],
            "current_outputs": list(current_outputs),
        }, broadcast=False)


def _format_value(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value)

