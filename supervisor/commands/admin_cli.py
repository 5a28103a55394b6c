"""`comfy-worker restart-comfyui | drain | resume`: actions asked of the running daemon.

Each is one POST on the admin socket; the daemon answers `{"ok": ..., "message": ...}`. A done
action prints the message; a refused one is `Failed` with the daemon's message; no daemon is
`DaemonUnreachable`.
"""

from __future__ import annotations

import json

import click

from supervisor.commands import app
from supervisor.commands.admin_socket import ask, locate

ACTION_TIMEOUT = 30.0  # a restart waits for ComfyUI to stop

_SOCKET_OPTION = click.option("--socket", "socket_path", default=None,
                              help="Admin socket of the daemon (default: worker.admin_socket).")
_INSTANCE_OPTION = click.option("--instance", type=click.IntRange(min=0), default=None,
                                help="Only this instance of a multi-GPU host (default: all).")


def _act(ctx: click.Context, route: str, socket_path: str | None, instance: int | None) -> None:
    socket = locate(app.settings(ctx), socket_path)
    if instance is not None:
        route += f"?instance={instance}"
    answer = ask(socket, "POST", route, timeout=ACTION_TIMEOUT)
    message = str(answer.get("message", json.dumps(answer)))
    if not answer.get("ok", True):
        raise app.Failed(message)
    click.echo(message)


@app.command("restart-comfyui")
@_SOCKET_OPTION
@_INSTANCE_OPTION
@click.pass_context
def restart_comfyui(ctx: click.Context, socket_path: str | None, instance: int | None) -> None:
    """Restart ComfyUI now (also ends a failed cool-down)."""
    _act(ctx, "/restart/comfyui", socket_path, instance)


@app.command("drain")
@_SOCKET_OPTION
@_INSTANCE_OPTION
@click.pass_context
def drain(ctx: click.Context, socket_path: str | None, instance: int | None) -> None:
    """Take no new work; requests already queued finish."""
    _act(ctx, "/drain", socket_path, instance)


@app.command("resume")
@_SOCKET_OPTION
@_INSTANCE_OPTION
@click.pass_context
def resume(ctx: click.Context, socket_path: str | None, instance: int | None) -> None:
    """Take work again after `drain`."""
    _act(ctx, "/resume", socket_path, instance)
