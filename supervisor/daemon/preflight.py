"""Checks made once before anything starts; each failure is one clear sentence."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from config import Settings
from supervisor.gpu.handin import advice, look


class PreflightError(Exception):
    """The daemon cannot start as configured; the message says what to change."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def comfyui_listen_addresses(command: list[str]) -> list[str]:
    """The addresses a ComfyUI command line asks to listen on ('0.0.0.0' for a bare --listen).

    ComfyUI's --listen takes an optional comma-separated list; given without a value it means
    all IPv4 interfaces. Without --listen ComfyUI binds 127.0.0.1.
    """
    addresses: list[str] = []
    for index, arg in enumerate(command):
        if arg.startswith("--listen="):
            addresses += arg.split("=", 1)[1].split(",")
        elif arg == "--listen":
            following = command[index + 1] if index + 1 < len(command) else ""
            if not following or following.startswith("-"):
                addresses.append("0.0.0.0")
            else:
                addresses += following.split(",")
    return [a.strip() for a in addresses if a.strip()] or ["127.0.0.1"]


def check(settings: Settings) -> list[str]:
    """Problems that stop start-up; warnings are logged by the caller."""
    problems: list[str] = []
    if not settings.comfyui.allow_public_listen:
        public = [a for a in comfyui_listen_addresses(settings.comfyui.command)
                  if not _is_loopback(a)]
        if public:
            problems.append(
                f"comfyui.command listens on {', '.join(public)}: ComfyUI has no authentication, "
                "so it must listen on 127.0.0.1 only (use '--listen 127.0.0.1'); set "
                "comfyui.allow_public_listen = true to override")
    for name, url in (("comfyui.url", settings.comfyui.url), ("wrapper.url", settings.wrapper.url)):
        host = urlsplit(url).hostname or ""
        if not _is_loopback(host) and not settings.comfyui.allow_public_listen:
            problems.append(f"{name} is {url}: the worker talks to its children on loopback "
                            "only (127.0.0.1)")
    if not settings.autoscaler.report_addr and not settings.worker.auth_token and \
            not settings.worker.unsecured:
        problems.append("no authentication on the public port: set WORKER_AUTH_TOKEN (clients "
                        "send 'Authorization: Bearer <token>'), run behind the autoscaler "
                        "(REPORT_ADDR), or set UNSECURED=true to serve without any check")
    return problems


def gpu_hand_in(settings: Settings) -> str | None:
    """A warning when this is a container that got no GPU although one is required.

    Not a problem that stops start-up: the worker runs, unhealthy, and says why in /health;
    this names the runtime flag that hands the GPU in."""
    if settings.gpu.fake_source or not settings.gpu.required:
        return None
    return advice(look())
