"""Build the daemon's optional parts from settings: autoscaler link, GPU monitor, model
provisioning, benchmark."""

from __future__ import annotations

import logging
import os
from typing import Any

from api.comfy import folders as comfy_folders
from config import Settings

logger = logging.getLogger(__name__)


class WiringError(Exception):
    """A configuration that cannot be wired; the message names what is missing."""


def build_components(settings: Settings, environ: dict[str, str] | None = None
                     ) -> dict[str, Any]:
    environ = dict(os.environ if environ is None else environ)
    components: dict[str, Any] = {}
    if settings.autoscaler.report_addr:
        # Imported only in autoscaler mode: it brings in `cryptography`.
        from supervisor.autoscaler import AutoscalerEnv, AutoscalerEnvError
        from supervisor.autoscaler.link import AutoscalerLink

        environ.setdefault("REPORT_ADDR", settings.autoscaler.report_addr)
        try:
            env = AutoscalerEnv.from_environ(environ, settings.worker.port)
        except AutoscalerEnvError as exc:
            raise WiringError(f"autoscaler mode (REPORT_ADDR is set): {exc}") from None
        if env is not None:
            components["autoscaler"] = AutoscalerLink(env, settings)
    from supervisor.gpu.monitor import GpuMonitor

    components["gpu_monitor"] = GpuMonitor.from_settings(settings)
    from api.modelstore import ManifestError, load_manifest

    try:
        entries = load_manifest(settings)
    except ManifestError as exc:
        raise WiringError(f"model manifest: {exc}") from None
    if entries:
        from api.comfy.folders import GUESS
        from api.modelstore.store import build_store

        # ComfyUI creates a --base-directory itself, and an explicit models_dir is the
        # operator's word; a models folder guessed from install_path must sit in a real folder.
        folders = comfy_folders.from_settings(settings)
        if folders.models.why.startswith(GUESS) and \
                not folders.base.path.is_dir():
            raise WiringError(f"model manifest: ComfyUI's models folder "
                              f"{folders.models.describe()} is in a folder that does not exist; "
                              f"set comfyui.install_path, or comfyui.models_dir "
                              f"(COMFYUI_MODELS_DIR) to where ComfyUI reads its models")
        from supervisor.checks.provisioning import Provisioner

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
        from supervisor.checks.bench import BenchmarkSuite

        components["benchmark"] = BenchmarkSuite(settings)
    return components
