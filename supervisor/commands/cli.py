"""The `comfy-worker` command. Only this module turns errors into exit codes."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from config import SettingsError, check_file, load_settings, render_example, render_settings_docs
from config.logsetup import setup_logging


def _load(config_path: str | None):
    try:
        return load_settings(config_path)
    except SettingsError as exc:
        click.echo(f"comfy-worker: {exc}", err=True)
        sys.exit(2)


class _ConfigAnywhere(click.Group):
    """Takes `--config FILE` after any subcommand too (`comfy-worker run --config FILE`): people
    type it both ways. It is moved in front of the subcommand before click parses."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        moved: list[str] = []
        rest: list[str] = []
        index = 0
        while index < len(args):
            arg = args[index]
            if arg == "--":
                rest.extend(args[index:])
                break
            if arg == "--config" and index + 1 < len(args):
                moved += [arg, args[index + 1]]
                index += 2
                continue
            if arg.startswith("--config="):
                moved.append(arg)
            else:
                rest.append(arg)
            index += 1
        return super().parse_args(ctx, moved + rest)


@click.group(cls=_ConfigAnywhere, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML settings file (default: /etc/comfy-worker/worker.toml when it exists).")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """comfy-worker: a supervised ComfyUI worker for autoscaled GPU fleets.

    --config FILE may also come after the subcommand (`comfy-worker run --config FILE`).
    """
    ctx.obj = {"config_path": config_path}


# --- config --------------------------------------------------------------------------------------
@main.group("config")
def config_group() -> None:
    """Show, check or generate settings."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def config_show(ctx: click.Context, as_json: bool) -> None:
    """Print the effective settings and where each came from (secrets masked)."""
    settings = _load(ctx.obj["config_path"])
    rows = settings.public_view()
    if as_json:
        click.echo(json.dumps({"config_file": str(settings.config_path or ""),
                               "settings": rows}, indent=2))
        return
    click.echo(f"config file: {settings.config_path or '(none)'}")
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        value = json.dumps(row["value"]) if not isinstance(row["value"], str) else row["value"]
        click.echo(f"{row['name']:<{width}}  {value}  [{row['source']}]")


@config_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def config_check(file: str) -> None:
    """Validate a settings file on its own (the environment is ignored)."""
    from api.modelstore import ManifestError, load_manifest
    from supervisor.instances.plan import collisions

    try:
        settings = check_file(file)
    except SettingsError as exc:
        click.echo(f"{file}: {exc}", err=True)
        sys.exit(2)
    try:  # the model manifest's entries, field by field
        load_manifest(settings)
    except ManifestError as exc:
        click.echo(f"{file}: {exc}", err=True)
        sys.exit(2)
    # Warnings, not errors: a one-GPU host runs one instance and never collides.
    for warning in collisions(settings):
        click.echo(f"{file}: warning: on a host with several GPUs, {warning}", err=True)
    click.echo(f"{file}: OK")


@config_group.command("example")
def config_example() -> None:
    """Print a settings file that documents every key with its default."""
    click.echo(render_example(), nl=False)


@config_group.command("docs")
def config_docs() -> None:
    """Print docs/settings.md: every setting as a table, generated from the declarations."""
    click.echo(render_settings_docs(), nl=False)


# --- api -----------------------------------------------------------------------------------------
@main.command("api")
@click.option("--port", type=int, default=None, help="Port (default: api.port, 18288).")
@click.option("--host", default=None, help="Address (default: api.host, 127.0.0.1).")
@click.pass_context
def api_command(ctx: click.Context, port: int | None, host: str | None) -> None:
    """Serve the API wrapper (normally started by `comfy-worker run`)."""
    from api.__main__ import run

    sys.exit(run(_load(ctx.obj["config_path"]), port, host))


# --- run / demo ----------------------------------------------------------------------------------
def _run_daemon(settings) -> None:
    from supervisor.daemon import preflight
    from supervisor.daemon.daemon import Daemon, DaemonStartError
    from supervisor.daemon.wiring import WiringError, build_components

    setup_logging(settings.worker.log_level, settings.secrets(), name="[supervisor]")
    problems = preflight.check(settings)
    if problems:
        for problem in problems:
            click.echo(f"comfy-worker: {problem}", err=True)
        sys.exit(2)
    try:
        components = build_components(settings)
    except WiringError as exc:
        click.echo(f"comfy-worker: {exc}", err=True)
        sys.exit(2)
    daemon = Daemon(settings, **components)
    try:
        sys.exit(asyncio.run(daemon.run()))
    except DaemonStartError as exc:
        click.echo(f"comfy-worker: {exc}", err=True)
        sys.exit(1)


@main.command("run")
@click.pass_context
def run_command(ctx: click.Context) -> None:
    """Run the worker daemon: ComfyUI, the wrapper, the public port (systemd starts this)."""
    _run_daemon(_load(ctx.obj["config_path"]))


@main.command("demo")
@click.option("--port", type=int, default=3000, show_default=True, help="Public port.")
@click.option("--state", "state_dir", default=".demo-state", show_default=True,
              help="Folder for the demo's files.")
@click.option("--gpus", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Fake GPUs: one instance (simulator + wrapper) each.")
@click.pass_context
def demo_command(ctx: click.Context, port: int, state_dir: str, gpus: int) -> None:
    """Run the whole worker with the ComfyUI simulator: no GPU, no ComfyUI needed."""
    import os
    import secrets as _secrets

    from supervisor.commands.demo import demo_environment

    token = os.environ.get("WORKER_AUTH_TOKEN") or _secrets.token_urlsafe(18)
    env = demo_environment(Path(state_dir).resolve(), port, token, gpus)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    settings = _load(ctx.obj["config_path"])
    from api.host.ports import holders, local_port
    from supervisor.commands.admin_locate import (
        announce_demo_socket,
        forget_demo_socket,
    )

    ports = [("the public port (--port)", settings.worker.port)]
    for offset in range(gpus):
        which = f" of instance {offset}" if gpus > 1 else ""
        ports += [(f"ComfyUI's port{which}", local_port(settings.comfyui.url) + offset),
                  (f"the wrapper's port{which}", local_port(settings.wrapper.url) + offset)]
    for what, number in ports:
        taken = holders(number) if number else []
        if taken:
            click.echo(f"comfy-worker demo: {what} {number} is held by {taken[0].describe()}; "
                       f"stop that process (another demo?) or choose other ports", err=True)
            sys.exit(1)
    socket = Path(settings.worker.admin_socket)
    announce_demo_socket(socket)
    click.echo(
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
        + f"  files in {state_dir}/ ; Ctrl-C stops it.\n", err=True)
    try:
        _run_daemon(settings)
    finally:
        forget_demo_socket(socket)


# --- benchmark -----------------------------------------------------------------------------------
@main.command("benchmark")
@click.option("--comfyui-url", default=None,
              help="Run straight against this ComfyUI instead of through the running daemon.")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="ComfyUI's output folder, with --comfyui-url (default: from the settings).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--socket", "socket_path", default=None, help="Admin socket of the daemon.")
@click.pass_context
def benchmark_command(ctx: click.Context, comfyui_url: str | None, output_dir: str | None,
                      as_json: bool, socket_path: str | None) -> None:
    """Run the benchmark now and print seconds, it/s, expected time, verdict and causes."""
    from supervisor.commands.bench_cli import run_benchmark_command

    settings = _load(ctx.obj["config_path"])
    setup_logging("WARNING", settings.secrets())
    sys.exit(run_benchmark_command(settings, comfyui_url=comfyui_url, output_dir=output_dir,
                                   as_json=as_json, socket_path=socket_path))


# --- admin actions --------------------------------------------------------------------------------
def _admin_action(ctx: click.Context, route: str, socket_path: str | None,
                  instance: int | None = None) -> None:
    import aiohttp

    from supervisor.commands.admin_locate import locate
    from supervisor.reporting.admin import admin_request

    settings = _load(ctx.obj["config_path"])
    socket = locate(settings, socket_path)
    if instance is not None:
        route += f"?instance={instance}"
    try:
        answer = asyncio.run(admin_request(socket, "POST", route, timeout=30))
    except (OSError, aiohttp.ClientError) as exc:
        click.echo(f"comfy-worker: the daemon is not reachable at {socket} ({exc})", err=True)
        sys.exit(3)
    click.echo(answer.get("message", json.dumps(answer)))
    sys.exit(0 if answer.get("ok", True) else 1)


_SOCKET_OPTION = click.option("--socket", "socket_path", default=None,
                              help="Admin socket of the daemon (default: worker.admin_socket).")
_INSTANCE_OPTION = click.option("--instance", type=click.IntRange(min=0), default=None,
                                help="Only this instance of a multi-GPU host (default: all).")


@main.command("restart-comfyui")
@_SOCKET_OPTION
@_INSTANCE_OPTION
@click.pass_context
def restart_comfyui_command(ctx: click.Context, socket_path: str | None, instance: int | None) -> None:
    """Restart ComfyUI now (also ends a failed cool-down)."""
    _admin_action(ctx, "/restart/comfyui", socket_path, instance)


@main.command("drain")
@_SOCKET_OPTION
@_INSTANCE_OPTION
@click.pass_context
def drain_command(ctx: click.Context, socket_path: str | None, instance: int | None) -> None:
    """Take no new work; requests already queued finish."""
    _admin_action(ctx, "/drain", socket_path, instance)


@main.command("resume")
@_SOCKET_OPTION
@_INSTANCE_OPTION
@click.pass_context
def resume_command(ctx: click.Context, socket_path: str | None, instance: int | None) -> None:
    """Take work again after `drain`."""
    _admin_action(ctx, "/resume", socket_path, instance)


def _register_subcommands() -> None:
    from supervisor.commands.client_cli import client
    from supervisor.commands.gpu_check import gpu
    from supervisor.commands.health_cli import health
    from supervisor.commands.models_cli import models

    main.add_command(health)
    main.add_command(gpu)
    main.add_command(client)
    main.add_command(models)


_register_subcommands()

if __name__ == "__main__":  # pragma: no cover
    main()
