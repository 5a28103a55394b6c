"""Running one prompt: the executor, the execution order and the progress events.

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
import enum
import logging
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from simulator.assets import Assets, NoAssets
from simulator.caching import OutputCache, compute_signatures
from simulator.errors import InterruptProcessing
from simulator.faults import FaultInjector
from simulator.nodes import NODE_CLASSES, NodeEnv, NodeOutput, SimNode
from simulator.validation import full_type_name, input_info, is_link

logger = logging.getLogger(__name__)


class EventSink(Protocol):
    def send_sync(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        """Queue an event for the sockets of ``sid`` (all sockets when None)."""

    async def drain(self) -> None:
        """Wait until every queued event has been written to the sockets."""


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


class ExecutionResult(enum.Enum):
    SUCCESS = 0
    FAILURE = 1


@dataclass
class ExecutionOutcome:
    success: bool
    history_result: dict[str, Any]
    messages: list[tuple[str, dict[str, Any]]]


def _console_bar(value: int, total: int) -> None:
    """A tqdm-style bar on stderr, redrawn with ``\r`` at each step, as ComfyUI's samplers print
    one: a supervisor reading ComfyUI's output sees each step there, whoever submitted the prompt."""
    if total <= 0:
        return
    done = int(10 * value / total)
    end = "\n" if value >= total else ""
    sys.stderr.write(f"\r{int(100 * value / total):3d}%|{'#' * done}{' ' * (10 - done)}| "
                     f"{value}/{total}{end}")
    sys.stderr.flush()


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
        _console_bar(value, total)
        if value * 2 >= total:
            await self._executor.faults.checkpoint(f"node {self.node_id} step {value}/{total}")


class PromptExecutor:
    """Executes one prompt at a time and reports it as ComfyUI does."""

    def __init__(self, env: NodeEnv, sink: EventSink, classes: dict[str, type[SimNode]] | None = None,
                 cache_enabled: bool = True, assets: Assets | None = None) -> None:
        self.env = env
        # With the newest ComfyUI's assets on, output files are registered as they are
        # reported, and the reports (events and history) carry their asset ids.
        self.assets: Assets = assets if assets is not None else NoAssets()
        self._reported: dict[str, Any] = {}
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
        self._reported = {}
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
                ui_outputs[node_id] = self._reported.get(node_id, ui_info["output"])
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
            cached_ui = self.cache.ui(node_id) or {}
            output = await self._report(node_id, prompt_id, cached_ui.get("output"))
            if self.client_id is not None:
                self.sink.send_sync("executed", {"node": node_id, "display_node": node_id,
                                                 "output": output, "prompt_id": prompt_id},
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
                output = await self._report(node_id, prompt_id, result.ui)
                if self.client_id is not None:
                    self.sink.send_sync("executed", {"node": node_id, "display_node": node_id, "output": output,
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

    async def _report(self, node_id: str, prompt_id: str, output: Any) -> Any:
        """The UI output as reported: with asset ids when the assets system is on."""
        if not self.assets.enabled or not isinstance(output, dict):
            return output
        self._reported[node_id] = await self.assets.enrich_outputs(output, prompt_id)
        return self._reported[node_id]

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

