"""The worker's state: derived in one place from the children, the models, the GPU and the
benchmark.

Nothing else decides whether the worker takes work. `derive` is a pure function of its inputs,
so every combination can be tested without processes; `WorkerStateTracker` holds the current value,
logs every change as ``old -> new (reason)`` and tells its listeners (systemd STATUS=, the
autoscaler reporter, metrics).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from supervisor.children.child import ChildState

logger = logging.getLogger(__name__)


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    PROVISIONING = "provisioning"  # fetching the manifest's before_ready model files
    BENCHMARKING = "benchmarking"
    READY = "ready"
    DEGRADED = "degraded"        # serving, with a warning (GPU or benchmark)
    UNHEALTHY = "unhealthy"      # takes no new work
    STOPPING = "stopping"

    @property
    def serving(self) -> bool:
        return self in (WorkerState.READY, WorkerState.DEGRADED)


class Level(str, enum.Enum):
    OK = "ok"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class Verdict:
    """A part's opinion of the worker: a level and human reasons."""

    level: Level
    reasons: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


OK = Verdict(Level.OK)


@dataclass(frozen=True)
class ChildView:
    name: str
    state: ChildState
    reason: str
    ever_ready: bool


@dataclass(frozen=True)
class Inputs:
    children: tuple[ChildView, ...]
    gpu: Verdict = OK
    benchmark: Verdict = OK
    disk: Verdict = OK                # the disk guard: free space where requests write
    models: Verdict = OK              # unhealthy while a before_ready model keeps failing
    provisioning: str = ""            # what provisioning is doing; empty once the models are there
    benchmarking: bool = False
    benchmark_pending: bool = False   # first run not finished yet
    draining: bool = False
    stopping: bool = False


def derive(inputs: Inputs) -> tuple[WorkerState, str]:
    """The one rule that maps the parts to a worker state with its reason."""
    if inputs.stopping:
        return WorkerState.STOPPING, "stopping"
    for child in inputs.children:
        if child.state is ChildState.FAILED:
            return WorkerState.UNHEALTHY, f"{child.name} failed: {child.reason}"
    if inputs.models.level is Level.UNHEALTHY:
        return WorkerState.UNHEALTHY, inputs.models.reason
    if inputs.provisioning:
        return WorkerState.PROVISIONING, inputs.provisioning
    for child in inputs.children:
        if child.state is not ChildState.READY:
            if not child.ever_ready:
                return WorkerState.STARTING, f"waiting for {child.name}: {child.reason}"
            return WorkerState.UNHEALTHY, f"{child.name} {child.state.value}: {child.reason}"
    if inputs.gpu.level is Level.UNHEALTHY:
        return WorkerState.UNHEALTHY, inputs.gpu.reason
    if inputs.disk.level is Level.UNHEALTHY:
        return WorkerState.UNHEALTHY, inputs.disk.reason
    if inputs.benchmarking:
        return WorkerState.BENCHMARKING, "running the start-up benchmark"
    if inputs.benchmark.level is Level.UNHEALTHY:
        return WorkerState.UNHEALTHY, inputs.benchmark.reason
    if inputs.benchmark_pending:
        return WorkerState.BENCHMARKING, "waiting to run the start-up benchmark"
    if inputs.draining:
        return WorkerState.UNHEALTHY, "draining: the operator asked it to take no new work"
    warnings = [v.reason for v in (inputs.gpu, inputs.disk, inputs.benchmark)
                if v.level is Level.DEGRADED]
    if warnings:
        return WorkerState.DEGRADED, "; ".join(warnings)
    return WorkerState.READY, "ComfyUI and the wrapper are ready"


Listener = Callable[[WorkerState, WorkerState, str], None]


@dataclass(frozen=True)
class Readiness:
    """What the worker tells a scheduler outside it (the autoscaler).

    `max_perf`: requests per second it can serve now, the sum over the instances that serve
    (None without a benchmark figure); `started_at`: when the worker started (epoch seconds);
    `fatal`: why it will not serve again by itself (a crash loop that gave up, a critical XID, a
    slow or failed benchmark on every instance; empty otherwise). A restart in progress, a hot
    GPU or a model download are not fatal: they show in the state and in `max_perf`."""

    state: WorkerState
    reason: str
    max_perf: float | None = None
    started_at: float = 0.0
    fatal: str = ""


def combine(instances: list[tuple[str, WorkerState, str]]) -> tuple[WorkerState, str]:
    """The worker's state from its instances' (label, state, reason).

    One instance: its state, word for word (a one-GPU host reads as it always did). Several:
    ready when all are ready; degraded, with the reasons of the others, while some serve;
    unhealthy when none serves and none is on its way (starting, provisioning, benchmarking)."""
    if len(instances) == 1:
        return instances[0][1], instances[0][2]
    if any(state is WorkerState.STOPPING for _, state, _ in instances):
        return WorkerState.STOPPING, "stopping"
    serving = [i for i in instances if i[1].serving]
    out = [i for i in instances if i[1] is not WorkerState.READY]
    why = "; ".join(f"{label} {state.value}: {reason}" for label, state, reason in out)
    if len(serving) == len(instances):
        if not out:
            return WorkerState.READY, f"all {len(instances)} instances are ready"
        return WorkerState.DEGRADED, why
    if serving:
        return WorkerState.DEGRADED, (f"{len(serving)} of {len(instances)} instances serve; "
                                      + why)
    for state in (WorkerState.BENCHMARKING, WorkerState.PROVISIONING, WorkerState.STARTING):
        if any(s is state for _, s, _ in instances):
            return state, why
    return WorkerState.UNHEALTHY, f"no instance serves; {why}"


class WorkerStateTracker:
    def __init__(self, name: str = "worker", level: int = logging.INFO) -> None:
        self.name = name
        self.level = level
        self.state = WorkerState.STARTING
        self.reason = "starting"
        self.since = time.time()
        self.history: deque[dict] = deque(maxlen=100)
        self.history.append({"at": self.since, "state": self.state.value, "reason": self.reason})
        self.first_ready_at: float | None = None
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def update(self, state: WorkerState, reason: str) -> bool:
        if state is self.state and reason == self.reason:
            return False
        old = self.state
        # A new state is news; a new reason for the same state is detail.
        logger.log(self.level if state is not old else logging.DEBUG,
                   "%s: %s -> %s (%s)", self.name, old.value, state.value, reason)
        self.state, self.reason, self.since = state, reason, time.time()
        self.history.append({"at": self.since, "state": state.value, "reason": reason})
        if state.serving and self.first_ready_at is None:
            self.first_ready_at = self.since
        for listener in self._listeners:
            try:
                listener(old, state, reason)
            except Exception:  # a listener's bug must not stop state changes
                logger.exception("worker state listener failed")
        return True
