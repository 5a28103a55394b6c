"""The `comfy-worker` command. Only this module turns errors into exit codes."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from config import SettingsError, check_file, load_settings, render_example
from config.logsetup import setup_logging


def _load(config_path: str | None):
    try:
        return load_settings(config_path)
    except SettingsError as exc:
        click.echo(f"comfy-worker: {exc}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML settings file (default: /etc/comfy-worker/worker.toml when it exists).")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """comfy-worker: a supervised ComfyUI worker for autoscaled GPU fleets."""
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
    try:
        check_file(file)
    except SettingsError as exc:
        click.echo(f"{file}: {exc}", err=True)
        sys.exit(2)
    click.echo(f"{file}: OK")


@config_group.command("example")
def config_example() -> None:
    """Print a settings file that documents every key with its default."""
    click.echo(render_example(), nl=False)


# --- api -----------------------------------------------------------------------------------------
@main.command("api")
@click.option("--port", type=int, default=None, help="Port (default: api.port, 18288).")
@click.option("--host", default=None, help="Address (default: api.host, 127.0.0.1).")
@click.pass_context
def api_command(ctx: click.Context, port: int | None, host: str | None) -> None:
    """Serve the API wrapper (normally started by `comfy-worker run`)."""
    from api.app import serve

    settings = _load(ctx.obj["config_path"])
    setup_logging(settings.worker.log_level, settings.secrets(), name="[wrapper]")
    try:
        asyncio.run(serve(settings, port=port, host=host))
    except OSError as exc:
        click.echo(f"comfy-worker api: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
