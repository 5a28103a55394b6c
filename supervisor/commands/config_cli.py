"""`comfy-worker config show|check|example|docs`: the settings, seen, checked and documented."""

from __future__ import annotations

import json

import click

from api.modelstore import ManifestError, load_manifest
from config import SettingsError, check_file, render_example, render_settings_docs
from supervisor.commands import app
from supervisor.instances.plan import collisions, config_refusals


@app.group("config")
def config() -> None:
    """Show, check or generate settings."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def show(ctx: click.Context, as_json: bool) -> None:
    """Print the effective settings and where each came from (secrets masked)."""
    settings = app.settings(ctx)
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


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def check(file: str) -> None:
    """Validate a settings file on its own (the environment is ignored)."""
    try:
        settings = check_file(file)
        load_manifest(settings)  # the model manifest's entries, field by field
    except (SettingsError, ManifestError) as exc:
        raise app.BadSettings(f"{file}: {exc}") from None
    # Refused as the daemon would refuse them at start: two instances on one database.
    refused = config_refusals(settings)
    if refused:
        raise app.BadSettings(*(f"{file}: on a host with several GPUs, {p}" for p in refused))
    # Warnings, not errors: a one-GPU host runs one instance and never collides.
    for warning in collisions(settings):
        click.echo(f"{file}: warning: on a host with several GPUs, {warning}", err=True)
    click.echo(f"{file}: OK")


@config.command("example")
def example() -> None:
    """Print a settings file that documents every key with its default."""
    click.echo(render_example(), nl=False)


@config.command("docs")
def docs() -> None:
    """Print docs/settings.md: every setting as a table, generated from the declarations."""
    click.echo(render_settings_docs(), nl=False)
