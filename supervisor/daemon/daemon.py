"""`comfy-worker run`: the daemon that a systemd unit starts on a GPU host.

It owns, in start order (and stops in reverse): the GPU monitor, model provisioning, the instances
(a ComfyUI and an API wrapper per GPU, `supervisor.instances.instance`), the public server with its router,
the admin socket and the autoscaler reporter. One loop — the *watch loop* — ticks every second: it
derives the worker state from the instances', pets the systemd watchdog (so a stuck loop is
caught), and has each instance check that its running prompt is making progress. Signal handlers only set flags; the main
coroutine does the work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from api.host.ports import describe_bind_error
from config import Settings
from supervisor.children.child import ChildProcess, ChildSpec, ChildState
from supervisor.instances.instance import Instance
from supervisor.instances.probe import learn_flags
from supervisor.instances.plan import (
    InstancePlan,
    PlanError,
    plan_checked,
    select_gpus,
    uses_placeholders,
)
from supervisor.reporting.admin import AdminServer
from supervisor.reporting.families import (
    benchmark_families,
    child_families,
    info_family,
    instance_families,
    model_families,
)
from supervisor.reporting.metrics import WorkerMetrics
from supervisor.reporting.metrics_server import MetricsServer
from supervisor.sdnotify import SystemdNotifier
from supervisor.serving.gates import Gate, OpenGate, TokenGate
from supervisor.serving.public import PublicServer, RequestHooks
from supervisor.serving.routing import Router
from supervisor.state import OK, WorkerState, WorkerStateTracker, combine

logger = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0
#: Stop stages, in seconds; their sum must fit in the unit's TimeoutStopSec (a test checks it).
ADMIN_CLOSE_TIMEOUT = 2.0
PUBLIC_CLOSE_TIMEOUT = 2.0
METRICS_CLOSE_TIMEOUT = 1.0
REPORTER_FLUSH_TIMEOUT = 3.0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("comfy-worker")
    except PackageNotFoundError:
        return "unknown"


class DaemonStartError(Exception):
    """The daemon cannot start; the message says why in words (the CLI prints it)."""


def stop_budget(settings: Settings) -> float:
    """The longest a clean stop can take: drain, then each child's TERM→KILL, then the rest."""
    child = ChildSpec(name="budget", command=["true"],
                      stop_timeout=settings.supervisor.child_stop_timeout).stop_budget()
    return (settings.worker.drain_timeout + PUBLIC_CLOSE_TIMEOUT + METRICS_CLOSE_TIMEOUT
            + ADMIN_CLOSE_TIMEOUT
            + 2 * child + REPORTER_FLUSH_TIMEOUT)


def public_api_document(settings: Settings, auth: Any) -> dict[str, Any]:
    """The public port's OpenAPI document, built on each GET /openapi.json (in a thread): the
    modifier files are read as the wrapper reads them, so an operator's own are listed too."""
    from api.contract.modifiers import registry_from_settings
    from api.contract.openapi import public_document

    required = None
    if auth == "autoscaler":
        from supervisor.autoscaler import REQUIRED_AUTH_FIELDS

        required = REQUIRED_AUTH_FIELDS
    return public_document(registry_from_settings(settings), auth,
                           docs_public=settings.worker.docs_public, required_auth_fields=required)


class Daemon:
    def __init__(self, settings: Settings, *, environ: dict[str, str] | None = None,
                 gpu_monitor: Any = None, benchmark: Any = None, autoscaler: Any = None,
                 provisioner: Any = None):
        self.settings = settings
        self.environ = dict(os.environ if environ is None else environ)
        self.tracker = WorkerStateTracker()
        self.metrics = WorkerMetrics()
        self.notifier = SystemdNotifier(self.environ)
        self.gpu = gpu_monitor
        self.benchmark = benchmark     # a BenchmarkSuite: one controller per instance
        self.autoscaler = autoscaler
        self.provisioner = provisioner
        self.started_at = time.time()
        self.draining = False
        self.stopping = False
        self._stop_requests = 0
        self._stop_event = asyncio.Event()
        self._stop_now = asyncio.Event()   # a second SIGTERM/SIGINT: skip the drain
        self._last_tick = time.monotonic()
        self._events: list[dict[str, Any]] = []
        self._announced_ready = False
        self.instances: list[Instance] = []
        self.comfy_flags = None
        self.router = Router(settings.worker.queue_size, restarting=self._restarting)
        self.public: PublicServer | None = None
        self.admin: AdminServer | None = None
        self.metrics_server: MetricsServer | None = None
        self._register_metric_sources()
        self._public_runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []

    # --- instances ------------------------------------------------------------------------------
    def _common(self) -> dict[str, Any]:
        s = self.settings.supervisor
        return dict(probe_interval=s.probe_interval, probe_timeout=s.probe_timeout,
                    hang_timeout=s.hang_timeout, backoff_initial=s.backoff_initial,
                    backoff_max=s.backoff_max, crash_loop_count=s.crash_loop_count,
                    crash_loop_window=s.crash_loop_window, failed_cooldown=s.failed_cooldown,
                    stop_timeout=s.child_stop_timeout, log_max_bytes=s.log_max_bytes,
                    log_backups=s.log_backups)

    def _plan(self) -> list[InstancePlan]:
        """One instance per chosen GPU (supervisor/instances/plan.py), from the first GPU read."""
        latest = self.gpu.latest() if self.gpu else None
        gpus = latest.gpus if latest is not None else ()
        templated = uses_placeholders(self.settings)
        usable = [g for g in gpus if g.available]
        if not templated and len(usable) > 1:
            logger.warning("comfyui.command has no placeholders, so one instance serves this "
                           "host's %d GPUs; write --port {port} and {instance_folders} in it to "
                           "run one per GPU (README: multi-GPU hosts)", len(usable))
        try:
            slots = select_gpus(self.settings.comfyui.gpus, gpus, templated=templated)
            return plan_checked(self.settings, slots, self.comfy_flags)
        except PlanError as exc:
            raise DaemonStartError(str(exc)) from None

    def _build_instances(self) -> None:
        for plan in self._plan():
            instance = Instance(plan, self.settings, self, self._common(), lambda: self._session)
            if self.benchmark is not None:
                instance.benchmark = self.benchmark.for_instance(
                    plan.number, plan.state_dir, plan.gpu.name or "")
            self.instances.append(instance)
            self.router.add(instance)
            if plan.count > 1:
                logger.info("%s: ComfyUI %s, wrapper %s%s", instance.label, plan.comfyui_url,
                            plan.wrapper_url, f", CUDA_VISIBLE_DEVICES={plan.gpu.uuid}"
                            if plan.pinned else "")

    @property
    def comfyui(self) -> ChildProcess:
        """The first instance's ComfyUI (the only one on a one-GPU host)."""
        return self.instances[0].comfyui

    @property
    def wrapper(self) -> ChildProcess:
        return self.instances[0].wrapper

    def instance(self, number: int) -> Instance | None:
        return self.instances[number] if 0 <= number < len(self.instances) else None

    # What an instance asks of its host (supervisor.instances.instance.InstanceHost).
    def comfyui_lost(self, instance: Instance, reason: str) -> None:
        if self.router.running_on(instance.number):
            what = "ComfyUI" if len(self.instances) == 1 else f"ComfyUI of {instance.label}"
            self._tasks.append(asyncio.get_running_loop().create_task(
                self._abort_running(instance, f"{what} died during the request: {reason}"),
                name="abort-running"))

    def instance_changed(self, instance: Instance) -> None:
        self._recompute()

    def benchmark_finished(self, instance: Instance) -> None:
        self._recompute()   # a sibling's verdict may have changed too
        if self.autoscaler:
            self.autoscaler.state_changed(self)

    def event(self, source: str, text: str) -> None:
        self._event(source, text)

    def _restarting(self) -> bool:
        """A child is on its way back (not failed, not stopping): worth waiting for."""
        coming_back = (ChildState.RESTARTING, ChildState.STARTING)
        return not (self.stopping or self.draining) and any(
            i.comfyui.state in coming_back or i.wrapper.state in coming_back
            for i in self.instances if not i.draining)

    async def _abort_running(self, instance: Instance, message: str) -> None:
        """Answer the request ComfyUI was running with a 502 now; the ones queued behind it stay
        with the wrapper, which runs them on the new ComfyUI (or, on a multi-GPU host, move to
        another instance). The wrapper is asked which one runs (this project's says so in
        /health); for another wrapper, the oldest is taken."""
        running: str | None = None
        known = False
        assert self._session is not None
        try:
            async with self._session.get(f"{instance.wrapper_url}/health",
                                         timeout=aiohttp.ClientTimeout(total=0.5)) as response:
                detail = await response.json(content_type=None)
            if isinstance(detail, dict) and "running" in detail:
                running, known = detail["running"], True
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            pass
        if self.router.abort_running(instance, message, running, known):
            logger.warning("request in flight failed: %s", message)

    def _event(self, source: str, text: str) -> None:
        self._events.append({"at": time.time(), "source": source, "event": text})
        del self._events[:-100]

    # --- state ----------------------------------------------------------------------------------
    def _recompute(self) -> None:
        if not self.instances:
            return
        models = self.provisioner.verdict() if self.provisioner else OK
        provisioning = self.provisioner.reason() if self.provisioner else ""
        for instance in self.instances:
            gpu = OK
            if self.gpu:
                gpu = self.gpu.verdict(instance.plan.gpu.index if instance.plan.pinned else None)
            instance.derive(gpu=gpu, models=models, provisioning=provisioning,
                            draining=self.draining, stopping=self.stopping)
        state, reason = combine([(i.label, i.state, i.reason) for i in self.instances])
        self.router.changed()
        if self.tracker.update(state, reason):
            self.metrics.set_state(state)
            self.notifier.status(f"{state.value}: {reason}")
            if state.serving and not self._announced_ready:
                self._announced_ready = True
                self.notifier.ready(f"{state.value}: {reason}")
            if self.autoscaler:
                self.autoscaler.state_changed(self)

    def max_perf(self) -> float | None:
        """Requests per second the host can serve: the sum over the instances that serve."""
        figures = [i.benchmark.max_perf() for i in self.instances
                   if i.benchmark is not None and i.state.serving]
        known = [f for f in figures if f is not None]
        return sum(known) if known else None

    # --- watch loop -----------------------------------------------------------------------------
    async def _watch(self) -> None:
        interval = self.notifier.watchdog_interval()
        while not self.stopping:
            self._last_tick = time.monotonic()
            self._recompute()
            for instance in self.instances:
                instance.check_stall()
            if interval is not None:
                self.notifier.watchdog()
            for instance in self.instances:
                bench = instance.benchmark
                if bench is not None and bench.should_start(instance, self.models_ready):
                    self._tasks.append(asyncio.create_task(
                        bench.run(instance, self), name=f"benchmark{instance.plan.suffix}"))
            await asyncio.sleep(WATCH_INTERVAL)

    # --- metrics --------------------------------------------------------------------------------
    def _register_metric_sources(self) -> None:
        """What /metrics reads at each scrape; each part is asked, nothing is copied ahead."""
        from benchmark import BenchmarkStatus

        states = [state.value for state in ChildState]
        verdicts = [status.value for status in BenchmarkStatus]
        self.metrics.add_source(self._info_families)
        self.metrics.add_source(lambda: child_families(self.instances, states))
        self.metrics.add_source(lambda: instance_families(
            self.instances, [state.value for state in WorkerState], self.router.load))
        if self.benchmark is not None:
            self.metrics.add_source(lambda: benchmark_families(self.instances, verdicts))
        if self.gpu is not None:
            self.metrics.add_source(self.gpu.metric_families)
        if self.provisioner is not None:
            self.metrics.add_source(lambda: model_families(self.provisioner.totals(),
                                                           self.provisioner.missing()))
        self.metrics.queue_capacity.set(self.settings.worker.queue_size)

    @property
    def models_ready(self) -> bool:
        """Every before_ready model of the manifest is in place (true without a manifest)."""
        return self.provisioner is None or self.provisioner.ready

    def _info_families(self):
        latest = self.gpu.latest() if self.gpu else None
        return info_family(_version(), self.instances[0].comfyui_version if self.instances else "",
                           (latest.driver_version if latest else None) or "",
                           (latest.cuda_version if latest else None) or "")

    def liveness(self) -> tuple[bool, str]:
        age = time.monotonic() - self._last_tick
        if age > 10 * WATCH_INTERVAL + 5:
            return False, f"the watch loop has not ticked for {age:.0f} s"
        return True, f"the watch loop ticked {age:.1f} s ago"

    # --- snapshot -------------------------------------------------------------------------------
    def _first(self) -> Instance | None:
        return self.instances[0] if self.instances else None

    def snapshot(self) -> dict[str, Any]:
        first = self._first()
        latest = self.gpu.latest() if self.gpu else None
        return {
            "worker": {"state": self.tracker.state.value, "reason": self.tracker.reason,
                       "since": self.tracker.since, "pid": os.getpid(),
                       "uptime_s": round(time.time() - self.started_at, 1),
                       "draining": self.draining,
                       "history": list(self.tracker.history)[-20:]},
            # The first instance's, as on a one-GPU host; every instance is under "instances".
            "children": {"comfyui": first.comfyui.snapshot(),
                         "wrapper": first.wrapper.snapshot()} if first else {},
            "instances": [i.snapshot(latest, self.router.load(i.number))
                          for i in self.instances],
            "queue": {"in_flight": self.router.in_flight, "waiting": self.router.waiting,
                      "max_waiting": self.settings.worker.queue_size,
                      "comfyui": first.watch.activity().to_dict() if first else {},
                      "wrapper": first.wrapper_detail if first else {},
                      "served": self._served()},
            "gpu": self.gpu.snapshot() if self.gpu else {"status": "not monitored"},
            "benchmark": first.benchmark.snapshot() if first and first.benchmark
            else {"status": "disabled"},
            "max_perf": self.max_perf(),
            "models": self.provisioner.snapshot() if self.provisioner else {"status": "none"},
            "events": self._events[-30:],
            "auth": self.public.gate.name if self.public else None,
        }

    def _served(self) -> dict[str, float]:
        counts: dict[str, float] = {}
        for metric in self.metrics.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.value:
                    counts[sample.labels["status"]] = sample.value
        return counts

    def public_snapshot(self) -> dict[str, Any]:
        """What /health shows the world: states and reasons, no logs, no paths, no pids.

        Built from the parts directly: /health is probed often, the full snapshot is not."""
        first = self._first()
        bench = first.benchmark.snapshot() if first and first.benchmark else \
            {"status": "disabled"}
        return {
            "children": {kind: {"state": child.state.value, "reason": child.reason,
                                "restarts": child.restarts}
                         for kind, child in (("comfyui", first.comfyui),
                                             ("wrapper", first.wrapper))} if first else {},
            "instances": [i.public_view(self.router.load(i.number)) for i in self.instances],
            "gpu": {"verdict": self.gpu.verdict_summary() if self.gpu else None},
            "benchmark": {k: bench.get(k) for k in ("status", "reason", "seconds", "its",
                                                    "expected_seconds", "max_perf", "causes")},
            "max_perf": self.max_perf(),
            "queue": {"in_flight": self.router.in_flight, "waiting": self.router.waiting},
            "models": self._models_summary(),
        }

    def _models_summary(self) -> dict[str, Any]:
        if not self.provisioner:
            return {"status": "none"}
        snap = self.provisioner.snapshot()
        return {k: snap[k] for k in ("status", "reason", "done_bytes", "total_bytes", "failures")}

    # --- admin actions --------------------------------------------------------------------------
    def _chosen(self, params: dict[str, str]) -> list[Instance] | dict[str, Any]:
        """The instances an admin action is for: `instance=N`, else all of them."""
        raw = params.get("instance")
        if raw in (None, ""):
            return list(self.instances)
        if not raw.isdigit() or self.instance(int(raw)) is None:
            return {"ok": False,
                    "message": f"no instance {raw}: this host runs instances 0 to "
                               f"{len(self.instances) - 1}"}
        return [self.instances[int(raw)]]

    def _which(self, chosen: list[Instance]) -> str:
        if len(self.instances) == 1:
            return ""
        if len(chosen) == len(self.instances):
            return " (all instances)"
        return " (" + ", ".join(i.label for i in chosen) + ")"

    async def _restart_comfyui(self, params: dict[str, str]) -> dict[str, Any]:
        chosen = self._chosen(params)
        if isinstance(chosen, dict):
            return chosen
        await asyncio.gather(*(i.comfyui.restart("operator asked (comfy-worker restart-comfyui)")
                               for i in chosen))
        return {"ok": True, "message": "ComfyUI is restarting" + self._which(chosen)}

    async def _drain(self, params: dict[str, str]) -> dict[str, Any]:
        chosen = self._chosen(params)
        if isinstance(chosen, dict):
            return chosen
        if len(chosen) == len(self.instances):
            self.draining = True
        for instance in chosen:
            instance.draining = True
        self._recompute()
        return {"ok": True, "message": "draining: no new work; the queue finishes"
                + self._which(chosen)}

    async def _resume(self, params: dict[str, str]) -> dict[str, Any]:
        chosen = self._chosen(params)
        if isinstance(chosen, dict):
            return chosen
        self.draining = False
        for instance in chosen:
            instance.draining = False
        self._recompute()
        return {"ok": True, "message": "taking work again" + self._which(chosen)}

    async def _rerun_benchmark(self, params: dict[str, str]) -> dict[str, Any]:
        if not self.benchmark:
            return {"ok": False, "message": "the benchmark is disabled"}
        chosen = self._chosen(params)
        if isinstance(chosen, dict):
            return chosen
        answers = [i.benchmark.rerun() for i in chosen if i.benchmark is not None]
        self._recompute()
        refused = [a for a in answers if not a["ok"]]
        return refused[0] if refused else {"ok": True, "message": answers[0]["message"]
                                           + self._which(chosen)}

    # --- run ------------------------------------------------------------------------------------
    def _gate(self) -> Gate:
        if self.autoscaler:
            return self.autoscaler.gate()
        if self.settings.worker.auth_token:
            return TokenGate(self.settings.worker.auth_token)
        logger.warning("UNSECURED=true: the public port accepts work from anyone who reaches it")
        return OpenGate()

    def request_stop(self, signame: str) -> None:
        self._stop_requests += 1
        if self._stop_requests == 1:
            logger.info("%s received: stopping (drain up to %g s)", signame,
                        self.settings.worker.drain_timeout)
        else:
            logger.warning("%s received again: stopping now", signame)
            self._stop_now.set()
        self._stop_event.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        self._session = aiohttp.ClientSession()
        try:
            await self._start()
            await self._stop_event.wait()
        finally:
            await self._shutdown()
        return 0

    async def _start(self) -> None:
        s = self.settings
        self.metrics.set_state(self.tracker.state)
        self.notifier.status("starting: launching ComfyUI and the wrapper")
        Path(s.worker.log_dir).mkdir(parents=True, exist_ok=True)
        Path(s.worker.state_dir).mkdir(parents=True, exist_ok=True)
        if self.provisioner:
            # Downloads start at once, while ComfyUI starts: they are usually the long part.
            self.provisioner.on_change = self._recompute
            self._tasks.append(asyncio.create_task(self.provisioner.run(), name="provisioning"))
        if self.gpu:
            self.gpu.our_pids = lambda: set().union(*(i.pids() for i in self.instances))
            self.gpu.on_change = self._recompute
            await self.gpu.start()
        self.comfy_flags = await learn_flags(s)
        self._build_instances()
        for instance in self.instances:
            await instance.start()
        hooks = self.autoscaler.hooks() if self.autoscaler else RequestHooks()
        gate = self._gate()
        self.public = PublicServer(
            tracker=self.tracker, gate=gate, router=self.router, metrics=self.metrics, max_waiting=s.worker.queue_size,
            max_json_depth=s.worker.max_json_depth, request_timeout=s.api.request_timeout,
            liveness=self.liveness, snapshot=self.public_snapshot, hooks=hooks,
            document=partial(public_api_document, s, gate.name),
            docs_public=s.worker.docs_public)
        app = self.public.build_app(s.worker.max_body_bytes)
        self._public_runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                            shutdown_timeout=PUBLIC_CLOSE_TIMEOUT)
        await self._public_runner.setup()
        ssl_context = None
        if s.worker.use_ssl:
            import ssl

            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(str(s.worker.ssl_cert), str(s.worker.ssl_key))
        try:
            await web.TCPSite(self._public_runner, s.worker.host, s.worker.port,
                              ssl_context=ssl_context).start()
        except OSError as exc:
            reason = await asyncio.to_thread(describe_bind_error, s.worker.port, exc)
            logger.error("public port (worker.port): %s", reason)
            raise DaemonStartError(f"public port (worker.port): {reason}") from None
        logger.info("public server on %s://%s:%d", "https" if ssl_context else "http",
                    s.worker.host, s.worker.port)
        self.admin = AdminServer(Path(s.worker.admin_socket), snapshot=self.snapshot, actions={
            "restart/comfyui": self._restart_comfyui, "drain": self._drain,
            "resume": self._resume, "benchmark": self._rerun_benchmark})
        try:
            await self.admin.start()
        except OSError as exc:
            logger.error("admin socket %s unavailable (%s); `comfy-worker health` will read "
                         "only what it can see directly", s.worker.admin_socket, exc)
            self.admin = None
        if s.metrics.port:
            wrappers = [(i.wrapper_url, {"comfy_instance": str(i.number),
                                         "gpu": "" if i.plan.gpu.index is None
                                         else str(i.plan.gpu.index)}) for i in self.instances]
            self.metrics_server = MetricsServer(
                self.metrics, wrapper_url=self.instances[0].wrapper_url, wrappers=wrappers,
                token=s.metrics.token, close_timeout=METRICS_CLOSE_TIMEOUT)
            try:
                await self.metrics_server.start(s.metrics.host, s.metrics.port)
            except OSError as exc:
                # Serving goes on without figures; Prometheus' `up` shows the gap.
                logger.error("metrics listener %s:%d unavailable (%s); set metrics.port "
                             "(METRICS_PORT) to a free port, or 0 to turn it off",
                             s.metrics.host, s.metrics.port, exc)
        if self.autoscaler:
            await self.autoscaler.start(self)
        self._tasks.append(asyncio.create_task(self._watch(), name="watch"))

    async def _drain_queue(self) -> None:
        if not self.public:
            return
        deadline = time.monotonic() + self.settings.worker.drain_timeout
        while self.router.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    async def _shutdown(self) -> None:
        self.stopping = True
        self._recompute()
        self.notifier.stopping("stopping: draining, then stopping the children")
        if self._stop_requests <= 1:
            waiter = asyncio.create_task(self._drain_queue())
            second = asyncio.create_task(self._stop_now.wait())
            await asyncio.wait({waiter, second}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            second.cancel()
        if self.public:
            self.router.abort_all("the worker is stopping; the request did not finish within "
                                  "the drain time")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._public_runner:
            await self._public_runner.cleanup()
        if self.metrics_server:
            await self.metrics_server.close()
        if self.admin:
            try:
                await asyncio.wait_for(self.admin.close(), ADMIN_CLOSE_TIMEOUT)
            except asyncio.TimeoutError:
                logger.warning("admin socket did not close in %g s", ADMIN_CLOSE_TIMEOUT)
        # All at once: the stop budget (stop_budget) counts one instance's children.
        await asyncio.gather(*(i.stop() for i in self.instances))
        if self.autoscaler:
            await self.autoscaler.stop()
        if self.gpu:
            await self.gpu.stop()
        if self.provisioner:
            await self.provisioner.store.downloader.close()
        if self._session:
            await self._session.close()
        logger.info("stopped")
        self.notifier.close()
