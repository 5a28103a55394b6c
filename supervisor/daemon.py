"""`comfy-worker run`: the daemon that a systemd unit starts on a GPU host.

It owns, in start order (and stops in reverse): the GPU monitor, model provisioning, ComfyUI, the
API wrapper, the public server, the admin socket and the autoscaler reporter. One loop — the *watch loop* — ticks
every second: it derives the worker state, pets the systemd watchdog (so a stuck loop is caught),
and checks that a running prompt is making progress. Signal handlers only set flags; the main
coroutine does the work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from api.comfy import ComfyClient
from config import Settings
from supervisor.admin import AdminServer
from supervisor.child import ChildProcess, ChildSpec, ChildState, ProbeFailed
from supervisor.comfy_watch import ComfyWatch
from supervisor.gates import AutoscalerGate, Gate, OpenGate, TokenGate
from supervisor.metric_families import (
    benchmark_families,
    child_families,
    info_family,
    model_families,
)
from supervisor.metrics import WorkerMetrics
from supervisor.metrics_server import MetricsServer
from supervisor.ports import describe_bind_error, local_port
from supervisor.public import PublicServer, RequestHooks
from supervisor.sdnotify import SystemdNotifier
from supervisor.state import OK, ChildView, Inputs, Verdict, WorkerStateTracker, derive

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
    from api.modifiers import registry_from_settings
    from api.openapi import public_document

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
        self.benchmark = benchmark
        self.autoscaler = autoscaler
        self.provisioner = provisioner
        self.started_at = time.time()
        self.draining = False
        self.stopping = False
        self._stop_requests = 0
        self._stop_event = asyncio.Event()
        self._stop_now = asyncio.Event()   # a second SIGTERM/SIGINT: skip the drain
        self._last_tick = time.monotonic()
        self._wrapper_detail: dict[str, Any] = {}
        self._events: list[dict[str, Any]] = []
        self._announced_ready = False
        self.comfy_client = ComfyClient(settings.comfyui.url)
        self.comfyui = ChildProcess(self._comfyui_spec())
        self.wrapper = ChildProcess(self._wrapper_spec())
        self._wrapper_progress_at: float | None = None
        self.watch = ComfyWatch(self.comfy_client, output_at=lambda: self.comfyui.last_output_at,
                                wrapper_progress_at=lambda: self._wrapper_progress_at)
        self.public: PublicServer | None = None
        self.admin: AdminServer | None = None
        self.metrics_server: MetricsServer | None = None
        self.comfyui_version = ""
        self._register_metric_sources()
        self._public_runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []

    # --- children -------------------------------------------------------------------------------
    def _common(self) -> dict[str, Any]:
        s = self.settings.supervisor
        return dict(probe_interval=s.probe_interval, probe_timeout=s.probe_timeout,
                    hang_timeout=s.hang_timeout, backoff_initial=s.backoff_initial,
                    backoff_max=s.backoff_max, crash_loop_count=s.crash_loop_count,
                    crash_loop_window=s.crash_loop_window, failed_cooldown=s.failed_cooldown,
                    stop_timeout=s.child_stop_timeout, log_max_bytes=s.log_max_bytes,
                    log_backups=s.log_backups)

    def _comfyui_spec(self) -> ChildSpec:
        c = self.settings.comfyui
        log_dir = Path(self.settings.worker.log_dir)
        return ChildSpec(name="comfyui", command=list(c.command), cwd=c.cwd, env=dict(c.env),
                         probe=self._probe_comfyui, startup_timeout=c.startup_timeout,
                         log_path=log_dir / "comfyui.log", port=local_port(c.url),
                         label="our ComfyUI", **self._common())

    def _wrapper_spec(self) -> ChildSpec:
        w = self.settings.wrapper
        log_dir = Path(self.settings.worker.log_dir)
        command = list(w.command)
        env = dict(w.env)
        if not command:
            port = urlsplit(w.url).port or 18288
            command = [sys.executable, "-m", "supervisor.cli", "api", "--port", str(port),
                       "--host", urlsplit(w.url).hostname or "127.0.0.1"]
            if self.settings.config_path:
                env.setdefault("COMFY_WORKER_CONFIG", str(self.settings.config_path))
            # The wrapper reads the same settings; make sure it talks to the same ComfyUI.
            env.setdefault("COMFYUI_URL", self.settings.comfyui.url)
            # Its output folder it finds as the daemon does: from the same settings, or from
            # ComfyUI's command line (config/comfy_folders.py).
        return ChildSpec(name="wrapper", command=command, cwd=w.cwd, env=env,
                         probe=self._probe_wrapper, startup_timeout=w.startup_timeout,
                         log_path=log_dir / "wrapper.log", port=local_port(w.url),
                         label="our wrapper", **self._common())

    async def _probe_comfyui(self) -> None:
        try:
            await self.comfy_client.probe(timeout=self.settings.supervisor.probe_timeout)
        except Exception as exc:
            raise ProbeFailed(str(exc) or exc.__class__.__name__) from None

    async def _probe_wrapper(self) -> None:
        """Any answer of /health means the wrapper is alive (503 only says ComfyUI is down)."""
        assert self._session is not None
        url = f"{self.settings.wrapper.url}/health"
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(
                    total=self.settings.supervisor.probe_timeout)) as response:
                if response.status not in (200, 503):
                    raise ProbeFailed(f"GET /health answered {response.status}")
                try:
                    detail = await response.json()
                except (aiohttp.ContentTypeError, ValueError):
                    detail = None
                self._wrapper_detail = detail if isinstance(detail, dict) else {}
                # An optional extra of this project's wrapper; any other wrapper goes without.
                since = self._wrapper_detail.get("seconds_since_progress")
                self._wrapper_progress_at = time.monotonic() - since \
                    if isinstance(since, (int, float)) and since >= 0 else None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ProbeFailed(f"GET /health: {exc.__class__.__name__} {exc}".strip()) from None

    def _on_comfyui_change(self, child: ChildProcess, old: ChildState, new: ChildState,
                           reason: str) -> None:
        if new in (ChildState.RESTARTING, ChildState.FAILED, ChildState.STOPPED) and \
                old in (ChildState.READY, ChildState.UNHEALTHY):
            if self.public and self.public.dispatcher.busy:
                self._tasks.append(asyncio.get_running_loop().create_task(
                    self._abort_running(f"ComfyUI died during the request: {reason}"),
                    name="abort-running"))
        if new in (ChildState.RESTARTING, ChildState.FAILED):
            self._event("comfyui", f"{old.value} -> {new.value}: {reason}")
        if new is ChildState.READY and not self.stopping:
            self._tasks.append(asyncio.get_running_loop().create_task(
                self._learn_comfyui_version(), name="comfyui-version"))
        self._recompute()

    def _restarting(self) -> bool:
        """A child is on its way back (not failed, not stopping): worth waiting for."""
        coming_back = (ChildState.RESTARTING, ChildState.STARTING)
        return not (self.stopping or self.draining) and (
            self.comfyui.state in coming_back or self.wrapper.state in coming_back)

    async def _abort_running(self, message: str) -> None:
        """Answer the request ComfyUI was running with a 502 now; the ones queued behind it stay
        with the wrapper, which runs them on the new ComfyUI. The wrapper is asked which one
        runs (this project's says so in /health); for another wrapper, the oldest is taken."""
        running: str | None = None
        known = False
        assert self._session is not None
        try:
            async with self._session.get(f"{self.settings.wrapper.url}/health",
                                         timeout=aiohttp.ClientTimeout(total=0.5)) as response:
                detail = await response.json(content_type=None)
            if isinstance(detail, dict) and "running" in detail:
                running, known = detail["running"], True
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            pass
        if self.public and self.public.dispatcher.abort_running(message, running, known):
            logger.warning("request in flight failed: %s", message)

    async def _learn_comfyui_version(self) -> None:
        try:
            stats = await self.comfy_client.system_stats(
                timeout=self.settings.supervisor.probe_timeout)
        except Exception as exc:  # only a label on comfy_worker_info; try at the next ready
            logger.debug("ComfyUI version not read: %s", exc)
            return
        self.comfyui_version = stats.comfyui_version or ""

    def _on_wrapper_change(self, child: ChildProcess, old: ChildState, new: ChildState,
                           reason: str) -> None:
        if new in (ChildState.RESTARTING, ChildState.FAILED):
            self._event("wrapper", f"{old.value} -> {new.value}: {reason}")
        self._recompute()

    def _event(self, source: str, text: str) -> None:
        self._events.append({"at": time.time(), "source": source, "event": text})
        del self._events[:-100]

    # --- state ----------------------------------------------------------------------------------
    def _child_view(self, child: ChildProcess, ever_ready: bool) -> ChildView:
        return ChildView(name="ComfyUI" if child.name == "comfyui" else "the wrapper",
                         state=child.state, reason=child.reason, ever_ready=ever_ready)

    def _recompute(self) -> None:
        gpu = self.gpu.verdict() if self.gpu else OK
        bench: Verdict = self.benchmark.verdict() if self.benchmark else OK
        ever = self.tracker.first_ready_at is not None or (
            self.benchmark is not None and self.benchmark.started)
        inputs = Inputs(
            children=(self._child_view(self.comfyui, ever), self._child_view(self.wrapper, ever)),
            gpu=gpu, benchmark=bench,
            benchmarking=bool(self.benchmark and self.benchmark.running),
            benchmark_pending=bool(self.benchmark and self.benchmark.pending),
            draining=self.draining, stopping=self.stopping)
        if self.provisioner:
            inputs = replace(inputs, models=self.provisioner.verdict(),
                             provisioning=self.provisioner.reason())
        state, reason = derive(inputs)
        if self.tracker.update(state, reason):
            self.metrics.set_state(state)
            self.notifier.status(f"{state.value}: {reason}")
            if state.serving and not self._announced_ready:
                self._announced_ready = True
                self.notifier.ready(f"{state.value}: {reason}")
            if self.autoscaler:
                self.autoscaler.state_changed(self)

    # --- watch loop -----------------------------------------------------------------------------
    async def _watch(self) -> None:
        interval = self.notifier.watchdog_interval()
        while not self.stopping:
            self._last_tick = time.monotonic()
            self._recompute()
            self._check_stall()
            if interval is not None:
                self.notifier.watchdog()
            if self.benchmark and self.benchmark.should_start(self):
                self._tasks.append(asyncio.create_task(self.benchmark.run(self),
                                                       name="benchmark"))
            await asyncio.sleep(WATCH_INTERVAL)

    def _check_stall(self) -> None:
        """A prompt that makes no progress for longer than the stall limit: restart ComfyUI.

        Judged from ComfyUI itself (supervisor/comfy_watch.py), so it works with any wrapper."""
        if self.comfyui.state is not ChildState.READY:
            return
        reason = self.watch.stalled(self.settings.supervisor.stall_timeout)
        if reason is not None:
            self._event("comfyui", reason)
            self.watch.reset()
            self._wrapper_progress_at = None
            self.comfyui.report_hang(reason)

    # --- metrics --------------------------------------------------------------------------------
    def _register_metric_sources(self) -> None:
        """What /metrics reads at each scrape; each part is asked, nothing is copied ahead."""
        from benchmark import BenchmarkStatus

        states = [state.value for state in ChildState]
        verdicts = [status.value for status in BenchmarkStatus]
        self.metrics.add_source(self._info_families)
        self.metrics.add_source(lambda: child_families((self.comfyui, self.wrapper), states))
        if self.benchmark is not None:
            self.metrics.add_source(lambda: benchmark_families(
                self.benchmark.report, verdicts, self.benchmark.pending))
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
        return info_family(_version(), self.comfyui_version,
                           (latest.driver_version if latest else None) or "",
                           (latest.cuda_version if latest else None) or "")

    def liveness(self) -> tuple[bool, str]:
        age = time.monotonic() - self._last_tick
        if age > 10 * WATCH_INTERVAL + 5:
            return False, f"the watch loop has not ticked for {age:.0f} s"
        return True, f"the watch loop ticked {age:.1f} s ago"

    # --- snapshot -------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        dispatcher = self.public.dispatcher if self.public else None
        return {
            "worker": {"state": self.tracker.state.value, "reason": self.tracker.reason,
                       "since": self.tracker.since, "pid": os.getpid(),
                       "uptime_s": round(time.time() - self.started_at, 1),
                       "draining": self.draining,
                       "history": list(self.tracker.history)[-20:]},
            "children": {"comfyui": self.comfyui.snapshot(), "wrapper": self.wrapper.snapshot()},
            "queue": {"in_flight": dispatcher.in_flight if dispatcher else 0,
                      "waiting": dispatcher.waiting if dispatcher else 0,
                      "max_waiting": self.settings.worker.queue_size,
                      "comfyui": self.watch.activity().to_dict(),
                      "wrapper": self._wrapper_detail, "served": self._served()},
            "gpu": self.gpu.snapshot() if self.gpu else {"status": "not monitored"},
            "benchmark": self.benchmark.snapshot() if self.benchmark else {"status": "disabled"},
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
        dispatcher = self.public.dispatcher if self.public else None
        bench = self.benchmark.snapshot() if self.benchmark else {"status": "disabled"}
        return {
            "children": {child.name: {"state": child.state.value, "reason": child.reason,
                                      "restarts": child.restarts}
                         for child in (self.comfyui, self.wrapper)},
            "gpu": {"verdict": self.gpu.verdict_summary() if self.gpu else None},
            "benchmark": {k: bench.get(k) for k in ("status", "reason", "seconds", "its",
                                                    "expected_seconds", "max_perf", "causes")},
            "queue": {"in_flight": dispatcher.in_flight if dispatcher else 0,
                      "waiting": dispatcher.waiting if dispatcher else 0},
            "models": self._models_summary(),
        }

    def _models_summary(self) -> dict[str, Any]:
        if not self.provisioner:
            return {"status": "none"}
        snap = self.provisioner.snapshot()
        return {k: snap[k] for k in ("status", "reason", "done_bytes", "total_bytes", "failures")}

    # --- admin actions --------------------------------------------------------------------------
    async def _restart_comfyui(self) -> dict[str, Any]:
        await self.comfyui.restart("operator asked (comfy-worker restart-comfyui)")
        return {"ok": True, "message": "ComfyUI is restarting"}

    async def _drain(self) -> dict[str, Any]:
        self.draining = True
        self._recompute()
        return {"ok": True, "message": "draining: no new work; the queue finishes"}

    async def _resume(self) -> dict[str, Any]:
        self.draining = False
        self._recompute()
        return {"ok": True, "message": "taking work again"}

    async def _rerun_benchmark(self) -> dict[str, Any]:
        if not self.benchmark:
            return {"ok": False, "message": "the benchmark is disabled"}
        return await self.benchmark.request_rerun(self)

    # --- run ------------------------------------------------------------------------------------
    def _gate(self) -> Gate:
        if self.autoscaler:
            return AutoscalerGate(self.autoscaler.authenticator)
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
            from supervisor.gpu_monitor import process_tree

            self.gpu.our_pids = lambda: process_tree(self.comfyui.pid)
            self.gpu.on_change = self._recompute
            await self.gpu.start()
        self.comfyui.add_listener(self._on_comfyui_change)
        self.wrapper.add_listener(self._on_wrapper_change)
        await self.comfyui.start()
        await self.wrapper.start()
        self.watch.start()
        hooks = self.autoscaler.hooks() if self.autoscaler else RequestHooks()
        gate = self._gate()
        self.public = PublicServer(
            tracker=self.tracker, gate=gate, wrapper_url=s.wrapper.url,
            metrics=self.metrics, max_waiting=s.worker.queue_size,
            max_json_depth=s.worker.max_json_depth, request_timeout=s.api.request_timeout,
            liveness=self.liveness, snapshot=self.public_snapshot, hooks=hooks,
            restarting=self._restarting,
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
            self.metrics_server = MetricsServer(self.metrics, wrapper_url=s.wrapper.url,
                                                token=s.metrics.token,
                                                close_timeout=METRICS_CLOSE_TIMEOUT)
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
        while self.public.dispatcher.busy and time.monotonic() < deadline:
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
            self.public.dispatcher.abort_all("the worker is stopping; the request did not "
                                                 "finish within the drain time")
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
        await self.watch.stop()
        await self.wrapper.stop()
        await self.comfyui.stop()
        if self.autoscaler:
            await self.autoscaler.stop()
        if self.gpu:
            await self.gpu.stop()
        await self.comfy_client.close()
        if self.provisioner:
            await self.provisioner.store.downloader.close()
        if self._session:
            await self._session.close()
        logger.info("stopped")
        self.notifier.close()
