"""Build the daemon's optional parts from settings: autoscaler link, GPU monitor, model
provisioning, benchmark."""

from __future__ import annotations

import logging
import os
from typing import Any

import aiohttp

from config import Settings
from supervisor.public import RequestHooks

logger = logging.getLogger(__name__)


class WiringError(Exception):
    """A configuration that cannot be wired; the message names what is missing."""


class AutoscalerLink:
    """The Vast-style autoscaler: signature checks on the way in, status reports on the way out."""

    def __init__(self, env: Any, settings: Settings):
        from supervisor.autoscaler import ReplayGuard, RequestAuthenticator

        self.env = env
        self.settings = settings
        self.fetcher = None
        self.reporter = None
        self.session: aiohttp.ClientSession | None = None
        self.authenticator = RequestAuthenticator(
            self, legacy=settings.autoscaler.legacy_signatures,
            unsecured=settings.worker.unsecured,
            replay_guard=ReplayGuard(window=settings.autoscaler.replay_window),
            # The signature covers only the URL: binding it to our own public URL is what stops
            # a request signed for another worker from being replayed here.
            expected_url=env.public_url if settings.autoscaler.check_url else None)

    @property
    def key(self):  # KeySource for the authenticator: None until the fetcher has the key
        return self.fetcher.key if self.fetcher else None

    async def start(self, daemon: Any) -> None:
        from supervisor.autoscaler import PublicKeyFetcher, StatusReporter

        self.session = aiohttp.ClientSession()
        self.fetcher = PublicKeyFetcher(self.env.report_addrs, self.session)
        self.fetcher.start()
        self.reporter = StatusReporter(self.env, self.session,
                                       interval=self.settings.autoscaler.report_interval,
                                       min_interval=min(1.0,
                                                        self.settings.autoscaler.report_interval))
        self.reporter.start()
        self.state_changed(daemon)

    async def stop(self) -> None:
        if self.reporter:
            await self.reporter.stop()
        if self.fetcher:
            await self.fetcher.stop()
        if self.session:
            await self.session.close()

    def state_changed(self, daemon: Any) -> None:
        if not self.reporter:
            return
        tracker = daemon.tracker
        serving = tracker.state.serving
        # The sum over the instances that serve: one worker, N GPUs' worth of work.
        max_perf = daemon.max_perf()
        loadtime = (tracker.first_ready_at - daemon.started_at) if tracker.first_ready_at else None
        # Loading (starting, benchmarking) is normal and carries no error; only a worker that
        # cannot serve says why, so the autoscaler does not write off a node that is warming up.
        from supervisor.state import WorkerState

        failing = tracker.state is WorkerState.UNHEALTHY
        self.reporter.set_state(ready=serving, error_msg=tracker.reason if failing else "",
                                max_perf=max_perf, loadtime=loadtime)

    def hooks(self) -> RequestHooks:
        def received(admitted) -> None:
            if self.reporter and admitted.request_idx is not None:
                self.reporter.request_received(admitted.request_idx, admitted.cost)

        def started(admitted) -> None:
            if self.reporter and admitted.request_idx is not None:
                self.reporter.request_started(admitted.request_idx)

        def finished(admitted, status: int, entered: float, began: float, ended: float) -> None:
            if self.reporter and admitted.request_idx is not None:
                outcome = "Success" if status == 200 else ("Cancelled" if status == 499
                                                           else "Error")
                self.reporter.request_finished(admitted.request_idx, status == 200, outcome,
                                               entered, began, ended)

        def rejected(admitted) -> None:
            if self.reporter:
                self.reporter.request_rejected(
                    admitted.cost if admitted else 1.0,
                    admitted.request_idx if admitted else None)

        return RequestHooks(received=received, started=started, finished=finished,
                            rejected=rejected)


def build_components(settings: Settings, environ: dict[str, str] | None = None
                     ) -> dict[str, Any]:
    environ = dict(os.environ if environ is None else environ)
    components: dict[str, Any] = {}
    if settings.autoscaler.report_addr:
        # Imported only in autoscaler mode: it brings in `cryptography`.
        from supervisor.autoscaler import AutoscalerEnv, AutoscalerEnvError

        environ.setdefault("REPORT_ADDR", settings.autoscaler.report_addr)
        try:
            env = AutoscalerEnv.from_environ(environ, settings.worker.port)
        except AutoscalerEnvError as exc:
            raise WiringError(f"autoscaler mode (REPORT_ADDR is set): {exc}") from None
        if env is not None:
            components["autoscaler"] = AutoscalerLink(env, settings)
    from supervisor.gpu_monitor import GpuMonitor

    components["gpu_monitor"] = GpuMonitor.from_settings(settings)
    from api.modelstore import ManifestError, load_manifest

    try:
        entries = load_manifest(settings)
    except ManifestError as exc:
        raise WiringError(f"model manifest: {exc}") from None
    if entries:
        from config.comfy_folders import GUESS
        from api.modelstore.store import build_store

        # ComfyUI creates a --base-directory itself, and an explicit models_dir is the
        # operator's word; a models folder guessed from install_path must sit in a real folder.
        folders = settings.comfyui_folders
        if folders.models.why.startswith(GUESS) and \
                not folders.base.path.is_dir():
            raise WiringError(f"model manifest: ComfyUI's models folder "
                              f"{folders.models.describe()} is in a folder that does not exist; "
                              f"set comfyui.install_path, or comfyui.models_dir "
                              f"(COMFYUI_MODELS_DIR) to where ComfyUI reads its models")
        from supervisor.provisioning import Provisioner

        # A script in comfyui.command can hide ComfyUI's --base-directory; ComfyUI is not up yet
        # to be asked, so a guessed models folder is said in every provisioning reason.
        note = "" if not folders.models.why.startswith(GUESS) else (
            f"into {folders.models.describe()}, a guess: set comfyui.models_dir "
            "(COMFYUI_MODELS_DIR) if ComfyUI reads its models elsewhere")
        components["provisioner"] = Provisioner(
            build_store(settings, environ), entries,
            backoff_initial=settings.models.backoff_initial,
            backoff_max=settings.models.backoff_max, folder_note=note)
    if settings.benchmark.enabled:
        from supervisor.bench import BenchmarkSuite

        components["benchmark"] = BenchmarkSuite(settings)
    return components
