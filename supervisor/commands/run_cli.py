"""`comfy-worker run` and `comfy-worker demo`: the worker daemon, for real or with the simulator."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from pathlib import Path

import click

from api.host.ports import holders, local_port
from config import Settings
from config.logsetup import setup_logging
from supervisor.commands import app
from supervisor.commands.admin_socket import announce_demo_socket, forget_demo_socket
from supervisor.commands.demo import demo_environment
from supervisor.daemon import preflight
from supervisor.daemon.daemon import Daemon, DaemonStartError, Ending
from supervisor.daemon.wiring import WiringError, build_components


#: How the daemon's ending becomes the exit status (app.EXIT_CODES says what each means).
ENDINGS = {Ending.STOPPED: app.Outcome.OK, Ending.RESTART_REQUESTED: app.Outcome.RESTART_REQUESTED}


def run_daemon(settings: Settings) -> app.Outcome:
    """Run the daemon until it is stopped; how it ended."""
    setup_logging(settings.worker.log_level, settings.secrets(), name="[supervisor]")
    problems = preflight.check(settings)
    if problems:
        raise app.BadSettings(*problems)
    hand_in = preflight.gpu_hand_in(settings)
    if hand_in:
        logging.getLogger("supervisor.daemon.preflight").warning("GPU: %s", hand_in)
    try:
        components = build_components(settings)
    except WiringError as exc:
        raise app.BadSettings(str(exc)) from None
    daemon = Daemon(settings, **components)
    try:
        return ENDINGS[asyncio.run(daemon.run())]
    except DaemonStartError as exc:
        raise app.Failed(str(exc)) from None


@app.command("run")
@click.pass_context
def run(ctx: click.Context) -> app.Outcome:
    """Run the worker daemon: ComfyUI, the wrapper, the public port (systemd starts this)."""
    return run_daemon(app.settings(ctx))


@app.command("demo")
@click.option("--port", type=int, default=3000, show_default=True, help="Public port.")
@click.option("--state", "state_dir", default=".demo-state", show_default=True,
              help="Folder for the demo's files.")
@click.option("--gpus", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Fake GPUs: one instance (simulator + wrapper) each.")
@click.pass_context
def demo(ctx: click.Context, port: int, state_dir: str, gpus: int) -> app.Outcome:
    """Run the whole worker with the ComfyUI simulator: no GPU, no ComfyUI needed."""
    token = os.environ.get("WORKER_AUTH_TOKEN") or secrets.token_urlsafe(18)
    env = demo_environment(Path(state_dir).resolve(), port, token, gpus)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    settings = app.settings(ctx)
    _refuse_held_ports(settings, gpus)
    socket = Path(settings.worker.admin_socket)
    announce_demo_socket(socket)
    click.echo(_welcome(settings, socket, state_dir, gpus), err=True)
    try:
        return run_daemon(settings)
    finally:
        forget_demo_socket(socket)


def _refuse_held_ports(settings: Settings, gpus: int) -> None:
    ports = [("the public port (--port)", settings.worker.port)]
    for offset in range(gpus):
        which = f" of instance {offset}" if gpus > 1 else ""
        ports += [(f"ComfyUI's port{which}", local_port(settings.comfyui.url) + offset),
                  (f"the wrapper's port{which}", local_port(settings.wrapper.url) + offset)]
    for what, number in ports:
        taken = holders(number) if number else []
        if taken:
            raise app.Failed(f"{what} {number} is held by {taken[0].describe()}; stop that "
                             "process (another demo?) or choose other ports")


def _welcome(settings: Settings, socket: Path, state_dir: str, gpus: int) -> str:
    return (
        f"\ncomfy-worker demo: ComfyUI simulator + API wrapper + supervisor on "
        f"http://127.0.0.1:{settings.worker.port}\n"
        f"  try:   curl -s -H 'Authorization: Bearer {settings.worker.auth_token}' "
        f"-H 'Content-Type: application/json' "
        f"-d '{{\"input\": {{\"modifier\": \"Text2Image\", \"modifications\": "
        f"{{\"prompt\": \"a lighthouse at dusk\", \"width\": 256, \"height\": 256, "
        f"\"steps\": 10}}}}}}' http://127.0.0.1:{settings.worker.port}/generate/sync\n"
        f"  health: .venv/bin/comfy-worker health   (it finds this demo's admin socket, "
        f"{socket})\n"
        + (f"  metrics: curl -s http://{settings.metrics.host}:{settings.metrics.port}/metrics\n"
           if settings.metrics.port else "")
        + (f"  {gpus} fake GPUs, one instance each: add \"clock_event_reasons\": "
           f"[\"hw_thermal_slowdown\"] to one in {state_dir}/gpus.json and watch its instance "
           "go out and come back\n" if gpus > 1 else "")
        + f"  files in {state_dir}/ ; Ctrl-C stops it.\n")
