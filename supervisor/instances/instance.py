"""One instance: a ComfyUI and its wrapper on one GPU, judged on their own.

An instance owns its two children, the watch on its ComfyUI's progress, its benchmark and its
state. Its state is derived by the same rule as a one-GPU worker's (`supervisor.state.derive`),
from its own children, its own GPU's verdict and its own benchmark, so a crash, a hang, a hot GPU
or a slow benchmark takes out only this instance. The daemon composes the instances and derives
the worker's state from theirs (`supervisor.state.combine`).

The instance knows nothing of the public port: when its ComfyUI dies it tells its host
(`InstanceHost.comfyui_lost`), which fails the request it ran.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence
from urllib.parse import urlsplit

import aiohttp

from api.comfy import ComfyClient
from api.comfy import folders as comfy_folders
from api.comfy.capabilities import Capabilities
from api.comfy.failures import startup_failures
from api.comfy.flags import main_scripts
from api.comfy.folders import guessed
from api.host.ports import local_port
from api.host.processes import process_tree
from benchmark.models import BenchmarkReport
from config import Settings
from supervisor.children.child import ChildProcess, ChildSpec, ChildState, ProbeFailed
from supervisor.gpu.model import GpuSnapshot
from supervisor.instances.plan import AssetsMode, InstancePlan
from supervisor.instances.watch import ComfyWatch
from supervisor.state import (
    OK,
    ChildView,
    Inputs,
    Verdict,
    WorkerState,
    WorkerStateTracker,
    derive,
)

logger = logging.getLogger(__name__)


def _make_dirs(paths: Any) -> None:
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)


class InstanceHost(Protocol):
    """What an instance asks of the daemon that composes it."""

    @property
    def stopping(self) -> bool: ...

    def comfyui_lost(self, instance: "Instance", reason: str) -> None: ...

    def instance_changed(self, instance: "Instance") -> None: ...

    def event(self, source: str, text: str) -> None: ...


class InstanceBenchmark(Protocol):
    """What an instance reads of its benchmark (supervisor.checks.bench.BenchmarkController)."""

    started: bool
    running: bool
    pending: bool
    report: BenchmarkReport | None

    def verdict(self) -> Verdict: ...

    def status(self) -> str: ...

    def max_perf(self) -> float | None: ...

    def snapshot(self) -> dict[str, Any]: ...


class Instance:
    def __init__(self, plan: InstancePlan, settings: Settings, host: InstanceHost,
                 common: dict[str, Any], session: Callable[[], aiohttp.ClientSession | None]):
        self.plan = plan
        self.number = plan.number
        self.settings = settings
        self.host = host
        self._session = session
        self.comfy_client = ComfyClient(plan.comfyui_url)
        self.comfyui = ChildProcess(self._comfyui_spec(common))
        self.wrapper = ChildProcess(self._wrapper_spec(common))
        self.wrapper_detail: dict[str, Any] = {}
        self._wrapper_progress_at: float | None = None
        self.watch = ComfyWatch(self.comfy_client, output_at=lambda: self.comfyui.last_output_at,
                                wrapper_progress_at=lambda: self._wrapper_progress_at)
        # With one instance the worker's own log line says it all.
        self.tracker = WorkerStateTracker(
            name=self.label, level=logging.INFO if plan.count > 1 else logging.DEBUG)
        self.benchmark: InstanceBenchmark | None = None   # when the benchmark is enabled
        self.draining = False
        self.comfyui_version = ""
        self.capabilities: Capabilities | None = None
        self._version_pending = True      # read from /system_stats once per ComfyUI start
        self.served = 0
        self.gpu_verdict: Verdict = OK
        self._tasks: list[asyncio.Task] = []
        self._folders_task: asyncio.Task | None = None

    # --- identity -------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self.plan.label()

    @property
    def wrapper_url(self) -> str:
        return self.plan.wrapper_url

    @property
    def state(self) -> WorkerState:
        return self.tracker.state

    @property
    def reason(self) -> str:
        return self.tracker.reason

    @property
    def accepting(self) -> bool:
        """Takes new work: serving, and the worker is not stopping."""
        return self.tracker.state.serving and not self.host.stopping

    # --- children -------------------------------------------------------------------------------
    def _comfyui_spec(self, common: dict[str, Any]) -> ChildSpec:
        c, plan = self.settings.comfyui, self.plan
        log_dir = Path(self.settings.worker.log_dir)
        return ChildSpec(name=f"comfyui{plan.suffix}", command=plan.comfyui.command,
                         cwd=plan.comfyui.cwd, env=plan.comfyui.env, probe=self._probe_comfyui,
                         startup_timeout=c.startup_timeout,
                         log_path=log_dir / f"comfyui{plan.suffix}.log",
                         port=local_port(plan.comfyui_url),
                         label="our ComfyUI" + (f" of {self.label}" if plan.count > 1 else ""),
                         failure_rules=startup_failures(plan.flags, c.assets), **common)

    def _wrapper_spec(self, common: dict[str, Any]) -> ChildSpec:
        w, plan = self.settings.wrapper, self.plan
        log_dir = Path(self.settings.worker.log_dir)
        command = list(plan.wrapper.command)
        env = dict(plan.wrapper.env)
        if not command:
            url = urlsplit(plan.wrapper_url)
            # `python -m api`: the wrapper alone, not the whole command line (memory, per GPU).
            command = [sys.executable, "-m", "api", "--port", str(url.port),
                       "--host", url.hostname or "127.0.0.1"]
            if self.settings.config_path:
                env.setdefault("COMFY_WORKER_CONFIG", str(self.settings.config_path))
            # The wrapper reads the same settings; make sure it talks to its own ComfyUI.
            env.setdefault("COMFYUI_URL", plan.comfyui_url)
            # Lets it check, after ComfyUI was lost, that the port is ComfyUI's again (ours).
            env["COMFY_WORKER_SUPERVISOR_PID"] = str(os.getpid())
            if plan.count > 1:
                # ... and finds that ComfyUI's own folders, and keeps its results apart.
                folders = plan.folders
                if not guessed(folders):
                    # A guess is not handed on as if it were a setting: the wrapper then asks
                    # ComfyUI itself (api/comfy/folders.py).
                    env.setdefault("COMFYUI_OUTPUT_DIR", str(folders.output.path))
                    env.setdefault("COMFYUI_INPUT_DIR", str(folders.input.path))
                    env.setdefault("COMFYUI_TEMP_DIR", str(folders.temp.path))
                env.setdefault("WORKER_STATE_DIR", str(plan.state_dir))
        return ChildSpec(name=f"wrapper{plan.suffix}", command=command, cwd=plan.wrapper.cwd,
                         env=env, probe=self._probe_wrapper, startup_timeout=w.startup_timeout,
                         log_path=log_dir / f"wrapper{plan.suffix}.log",
                         port=local_port(plan.wrapper_url),
                         label="our wrapper" + (f" of {self.label}" if plan.count > 1 else ""),
                         hang_excuse=self._comfyui_not_ready, **common)

    def _comfyui_not_ready(self) -> str | None:
        """The wrapper's excuse for a slow /health: a wrapper that asks ComfyUI there (the
        ai-dock wrapper waits up to 7 s) cannot answer while ComfyUI hangs. ComfyUI is judged,
        and restarted, on its own; the wrapper and the requests it holds are left alone."""
        if self.comfyui.state is ChildState.READY:
            return None
        return f"its ComfyUI is {self.comfyui.state.value}"

    async def _probe_comfyui(self) -> None:
        try:
            await self.comfy_client.probe(timeout=self.settings.supervisor.probe_timeout)
        except Exception as exc:
            raise ProbeFailed(str(exc) or exc.__class__.__name__) from None
        if self._version_pending:
            # Once per start, before it counts as ready: /health never shows a ready ComfyUI
            # of no version.
            await self._learn_comfyui_version()

    async def _probe_wrapper(self) -> None:
        """Any answer of /health means the wrapper is alive (503 only says ComfyUI is down)."""
        session = self._session()
        assert session is not None
        url = f"{self.plan.wrapper_url}/health"
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(
                    total=self.settings.supervisor.probe_timeout)) as response:
                if response.status not in (200, 503):
                    raise ProbeFailed(f"GET /health answered {response.status}")
                try:
                    detail = await response.json()
                except (aiohttp.ContentTypeError, ValueError):
                    detail = None
                self.wrapper_detail = detail if isinstance(detail, dict) else {}
                # An optional extra of this project's wrapper; any other wrapper goes without.
                since = self.wrapper_detail.get("seconds_since_progress")
                self._wrapper_progress_at = time.monotonic() - since \
                    if isinstance(since, (int, float)) and since >= 0 else None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ProbeFailed(f"GET /health: {exc.__class__.__name__} {exc}".strip()) from None

    def _on_comfyui_change(self, child: ChildProcess, old: ChildState, new: ChildState,
                           reason: str) -> None:
        if new in (ChildState.RESTARTING, ChildState.FAILED, ChildState.STOPPED) and \
                old in (ChildState.READY, ChildState.UNHEALTHY):
            self.host.comfyui_lost(self, reason)
        if new in (ChildState.RESTARTING, ChildState.FAILED):
            self.host.event(child.name, f"{old.value} -> {new.value}: {reason}")
        if new is ChildState.STARTING:
            # A new process, maybe another version: learn what it is and can do again.
            self._version_pending = True
            self.comfy_client.forget_capabilities()
            self.watch.comfyui_started()
        if new is ChildState.READY and not self.host.stopping:
            if guessed(self.plan.folders):
                self._folders_task = asyncio.get_running_loop().create_task(
                    self._learn_comfyui_folders(), name=f"{child.name}-folders")
                # One per ComfyUI start: finished ones go, so restarts do not grow the list.
                self._tasks = [t for t in self._tasks if not t.done()]
                self._tasks.append(self._folders_task)
        self.host.instance_changed(self)

    def _comfyui_exited(self, child: ChildProcess) -> None:
        if child.state in (ChildState.READY, ChildState.UNHEALTHY):
            self._tell_wrapper_comfyui_lost()

    def _tell_wrapper_comfyui_lost(self) -> None:
        """Our own wrapper gets SIGUSR1 (see api/wrapper/app.py): it then submits nothing until the
        process on ComfyUI's port is ours again. Another wrapper gets no signal it may not know."""
        pid = self.wrapper.pid
        # Only once it answers: before it installed its handler, SIGUSR1 would end it.
        if self.plan.wrapper.command or pid is None or self.wrapper.state is not ChildState.READY:
            return
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass

    def _on_wrapper_change(self, child: ChildProcess, old: ChildState, new: ChildState,
                           reason: str) -> None:
        if new in (ChildState.RESTARTING, ChildState.FAILED):
            self.host.event(child.name, f"{old.value} -> {new.value}: {reason}")
        self.host.instance_changed(self)

    async def _learn_comfyui_version(self) -> None:
        """What this ComfyUI is (its version, jobs API, assets; api/comfy/capabilities.py),
        asked once per start: shown in /health and the info metric, and checked against what
        was planned before it started."""
        try:
            caps = await self.comfy_client.capabilities(
                timeout=self.settings.supervisor.probe_timeout)
        except Exception as exc:  # a label and a line of /health: asked again at the next probe
            logger.debug("ComfyUI version not read: %s", exc)
            return
        self._version_pending = False
        self.capabilities = caps
        version = caps.version or ""
        if version and version != self.comfyui_version:
            flags = self.plan.flags
            logger.info("%s: %s; its flags: %s", self.label, caps.describe(),
                        flags.source if flags else "not asked")
        self.comfyui_version = version
        self._check_assets(caps)

    def _check_assets(self, caps: Capabilities) -> None:
        """ComfyUI's own word on its assets (its feature flags, newer ComfyUI) wins over the
        plan's; a ComfyUI running them against comfyui.assets = "off" is said."""
        if "assets" not in caps.features:
            return
        planned = self.plan.assets
        actual = AssetsMode.ON if caps.assets else AssetsMode.OFF
        if planned.mode is actual:
            return
        if planned.mode is AssetsMode.OFF or (actual is AssetsMode.ON
                                              and self.settings.comfyui.assets == "off"):
            logger.warning("%s: ComfyUI runs its assets database although comfyui.assets is "
                           "\"off\" (%s); set comfyui.version (COMFYUI_VERSION_OVERRIDE) so "
                           "--disable-assets is passed", self.label, planned.why)
        self.plan = dataclasses.replace(self.plan, assets=dataclasses.replace(
            planned, mode=actual, why=f"ComfyUI's feature flags say {actual.value}"))

    async def folders_settled(self) -> None:
        """Returns once a guess of ComfyUI's folders was checked against the running ComfyUI
        (the benchmark waits for it, so it looks for its image in the right place)."""
        task = self._folders_task
        if task is not None and not task.done():
            await asyncio.wait({task})

    async def _learn_comfyui_folders(self) -> None:
        """The folders were guessed under install_path: ask the running ComfyUI (its real
        command line) and use its folders from now on (benchmark, health, logs)."""
        port, pid = self.comfyui.spec.port, self.comfyui.pid
        if port is None or pid is None:
            return
        explicit = {kind: self.settings.get(f"comfyui.{kind}_dir")
                    for kind in ("output", "input", "temp", "models")}
        found = await asyncio.to_thread(comfy_folders.running_folders, port, pid,
                                        self.settings.comfyui.install_path, explicit)
        if found is None or found == self.plan.folders:
            return
        for kind in ("output", "input", "temp", "models"):
            old, new = getattr(self.plan.folders, kind), getattr(found, kind)
            if old.path != new.path:
                logger.info("%s: ComfyUI's %s folder is %s, not %s", self.label, kind,
                            new.describe(), old.describe())
        if found.models.path != self.plan.folders.models.path:
            # Provisioning ran before ComfyUI was up, into the guessed folder.
            self.host.event(self.comfyui.name,
                            f"ComfyUI reads its models from {found.models.describe()}, not from "
                            f"the guessed {self.plan.folders.models.describe()}; set "
                            "comfyui.models_dir (COMFYUI_MODELS_DIR) so models are provided there")
        self.plan = dataclasses.replace(self.plan, folders=found)

    def pids(self) -> set[int]:
        return process_tree(self.comfyui.pid)

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        flags = self.plan.flags
        unknown = flags.unknown_in(self.plan.comfyui.command) if flags else []
        if unknown and self.number == 0:
            logger.warning("%s", _unknown_flags_warning(self.plan.comfyui.command, unknown))
        if self.plan.make_dirs:
            await asyncio.to_thread(_make_dirs, self.plan.make_dirs)
        self.comfyui.add_listener(self._on_comfyui_change)
        # The wrapper is told at the exit itself, not once the reason is known: a stranger may
        # take the port meanwhile. Only a ComfyUI that served is news: one that failed to start
        # was never the wrapper's.
        self.comfyui.on_exit(self._comfyui_exited)
        self.wrapper.add_listener(self._on_wrapper_change)
        await self.comfyui.start()
        await self.wrapper.start()
        self.watch.start()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.watch.stop()
        await self.wrapper.stop()
        await self.comfyui.stop()
        await self.comfy_client.close()

    # --- state ----------------------------------------------------------------------------------
    def _child_view(self, child: ChildProcess, ever_ready: bool) -> ChildView:
        return ChildView(name="ComfyUI" if child is self.comfyui else "the wrapper",
                         state=child.state, reason=child.reason, ever_ready=ever_ready)

    def derive(self, *, gpu: Verdict, models: Verdict, provisioning: str, draining: bool,
               stopping: bool, disk: Verdict = OK) -> bool:
        """Judge this instance; True when its state or reason changed."""
        self.gpu_verdict = gpu
        bench = self.benchmark
        ever = self.tracker.first_ready_at is not None or (bench is not None and bench.started)
        inputs = Inputs(
            children=(self._child_view(self.comfyui, ever), self._child_view(self.wrapper, ever)),
            gpu=gpu, disk=disk, benchmark=bench.verdict() if bench else OK,
            benchmarking=bool(bench and bench.running),
            benchmark_pending=bool(bench and bench.pending),
            models=models, provisioning=provisioning,
            draining=draining or self.draining, stopping=stopping)
        state, reason = derive(inputs)
        return self.tracker.update(state, reason)

    def check_stall(self) -> None:
        """A prompt that makes no progress for longer than the stall limit: restart ComfyUI.

        Judged from ComfyUI itself (supervisor/instances/watch.py), so it works with any wrapper."""
        if self.comfyui.state is not ChildState.READY:
            return
        reason = self.watch.stalled(self.settings.supervisor.stall_timeout)
        if reason is not None:
            self.host.event(self.comfyui.name, reason)
            self.watch.reset()
            self._wrapper_progress_at = None
            self.comfyui.report_hang(reason)

    # --- views ----------------------------------------------------------------------------------
    def gpu_view(self, latest: GpuSnapshot | None) -> dict[str, Any]:
        gpu = self.plan.gpu
        body: dict[str, Any] = {"index": gpu.index, "uuid": gpu.uuid, "name": gpu.name,
                                "pinned": self.plan.pinned,
                                "verdict": self.gpu_verdict.level.value,
                                "reasons": list(self.gpu_verdict.reasons)}
        record = latest.gpu(gpu.index) if latest is not None and gpu.index is not None else None
        if record is not None:
            body["temperature_c"] = record.temperature.current_c
            body["utilization_pct"] = record.utilization.gpu_pct
        return body

    def snapshot(self, latest: GpuSnapshot | None = None, in_flight: int = 0) -> dict[str, Any]:
        """Everything an operator reads in `comfy-worker health`; the public /health view is a
        projection of it (supervisor.daemon.snapshot.public_instance)."""
        return {
            "instance": self.number, "label": self.label,
            "state": self.state.value, "reason": self.reason, "since": self.tracker.since,
            "draining": self.draining,
            "gpu": self.gpu_view(latest),
            "comfyui_url": self.plan.comfyui_url, "wrapper_url": self.plan.wrapper_url,
            "folders": {kind: {"path": str(folder.path), "why": folder.why}
                        for kind in ("output", "input", "temp", "models", "user")
                        for folder in (getattr(self.plan.folders, kind),)},
            "children": {"comfyui": self.comfyui.snapshot(), "wrapper": self.wrapper.snapshot()},
            "benchmark": self.benchmark.snapshot() if self.benchmark else {"status": "disabled"},
            "comfyui": {**self.watch.activity().to_dict(), "read_from": self.watch.source},
            "comfyui_version": self.comfyui_version,
            "comfyui_capabilities": self.capabilities.to_json() if self.capabilities else None,
            # "note": how the flags are known, in words fit for /health (no paths).
            "comfyui_flags": {**self.plan.flags.to_dict(), "note": self.plan.flags.public_note}
            if self.plan.flags else None,
            "assets": self.plan.assets.to_dict(),
            "in_flight": in_flight, "served": self.served,
        }


def _unknown_flags_warning(command: Sequence[str], unknown: Sequence[str]) -> str:
    """What to say of flags in comfyui.command that ComfyUI's --help does not list: ComfyUI
    exits 2 on them when the command is ComfyUI's own main.py; a start script may take them
    itself."""
    them = "it" if len(unknown) == 1 else "them"
    head = (f"comfyui.command passes {', '.join(unknown)}, which this ComfyUI does not know "
            "(its --help lists no such flag)")
    if main_scripts(list(command)):
        return f"{head}: it will exit 2; remove {them} from comfyui.command"
    return (f"{head}: unless {Path(command[0]).name} takes {them} itself, ComfyUI will exit 2 "
            f"(then remove {them} from comfyui.command)")
