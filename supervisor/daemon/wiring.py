"""Build the daemon's optional parts from settings: autoscaler link, GPU monitor, model
provisioning, benchmark."""

from __future__ import annotations

import logging
import os
from typing import TypedDict

from api.comfy import folders as comfy_folders
from api.comfy.folders import GUESS
from api.modelstore import ManifestError, load_manifest
from api.modelstore.store import build_store
from config import BY_NAME, Settings
from supervisor.checks.bench import BenchmarkSuite
from supervisor.checks.provisioning import Provisioner
from supervisor.daemon.parts import Autoscaler
from supervisor.gpu.monitor import GpuMonitor

logger = logging.getLogger(__name__)


class WiringError(Exception):
    """A configuration that cannot be wired; the message names what is missing."""


class Components(TypedDict, total=False):
    """The keyword arguments of `Daemon` that depend on the settings."""

    autoscaler: Autoscaler
    gpu_monitor: GpuMonitor
    provisioner: Provisioner
    benchmark: BenchmarkSuite


#: The settings the autoscaler's environment (`AutoscalerEnv`, read by the variables' names
#: as Vast sets them) may come from: what the file says fills a variable the environment lacks.
AUTOSCALER_SETTINGS = ("autoscaler.report_addr", "autoscaler.container_id",
                       "autoscaler.master_token", "autoscaler.public_ipaddr", "worker.use_ssl",
                       "worker.unsecured")


def autoscaler_environ(settings: Settings, environ: dict[str, str]) -> dict[str, str]:
    """`environ` with the autoscaler's variables it lacks taken from the settings."""
    merged = dict(environ)
    for name in AUTOSCALER_SETTINGS:
        setting = BY_NAME[name]
        value = getattr(getattr(settings, setting.section), setting.key)
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        if text:
            merged.setdefault(setting.env[0], text)
    return merged


def _autoscaler(settings: Settings, environ: dict[str, str]) -> Autoscaler | None:
    # Imported only in autoscaler mode: it brings in `cryptography`.
    from supervisor.autoscaler import AutoscalerEnv, AutoscalerEnvError, MissingEnvironment
    from supervisor.autoscaler.link import AutoscalerLink, with_ssl

    try:
        env = AutoscalerEnv.from_environ(autoscaler_environ(settings, environ),
                                         settings.worker.port)
    except AutoscalerEnvError as exc:
        hint = ""
        if isinstance(exc, MissingEnvironment):
            named = [s.name for s in (BY_NAME[n] for n in AUTOSCALER_SETTINGS)
                     if s.env[0] in exc.missing]
            if named:
                hint = f" (or set {', '.join(named)} in the configuration file)"
        raise WiringError(f"autoscaler mode (REPORT_ADDR is set): {exc}{hint}") from None
    if env is None:
        return None
    # The public URL's scheme follows what the public port serves (USE_SSL or the file).
    return AutoscalerLink(with_ssl(env, settings.worker.use_ssl), settings)


def _provisioner(settings: Settings, environ: dict[str, str]) -> Provisioner | None:
    try:
        entries = load_manifest(settings)
    except ManifestError as exc:
        raise WiringError(f"model manifest: {exc}") from None
    if not entries:
        return None
    # ComfyUI creates a --base-directory itself, and an explicit models_dir is the
    # operator's word; a models folder guessed from install_path must sit in a real folder.
    folders = comfy_folders.from_settings(settings)
    if folders.models.why.startswith(GUESS) and not folders.base.path.is_dir():
        raise WiringError(f"model manifest: ComfyUI's models folder "
                          f"{folders.models.describe()} is in a folder that does not exist; "
                          f"set comfyui.install_path, or comfyui.models_dir "
                          f"(COMFYUI_MODELS_DIR) to where ComfyUI reads its models")
    # A script in comfyui.command can hide ComfyUI's --base-directory; ComfyUI is not up yet
    # to be asked, so a guessed models folder is said in every provisioning reason.
    note = "" if not folders.models.why.startswith(GUESS) else (
        f"into {folders.models.describe()}, a guess: set comfyui.models_dir "
        "(COMFYUI_MODELS_DIR) if ComfyUI reads its models elsewhere")
    return Provisioner(build_store(settings, environ), entries,
                       backoff_initial=settings.models.backoff_initial,
                       backoff_max=settings.models.backoff_max, folder_note=note)


def build_components(settings: Settings, environ: dict[str, str] | None = None) -> Components:
    environ = dict(os.environ if environ is None else environ)
    components = Components()
    if settings.autoscaler.report_addr:
        autoscaler = _autoscaler(settings, environ)
        if autoscaler is not None:
            components["autoscaler"] = autoscaler
    components["gpu_monitor"] = GpuMonitor.from_settings(settings)
    provisioner = _provisioner(settings, environ)
    if provisioner is not None:
        components["provisioner"] = provisioner
    if settings.benchmark.enabled:
        components["benchmark"] = BenchmarkSuite(settings)
    return components
