"""`comfy-worker api`: the API wrapper process, as `comfy-worker run` starts it per instance."""

from __future__ import annotations

import click

from api.__main__ import run as serve_wrapper
from supervisor.commands import app


@app.command("api")
@click.option("--port", type=int, default=None, help="Port (default: api.port, 18288).")
@click.option("--host", default=None, help="Address (default: api.host, 127.0.0.1).")
@click.pass_context
def api(ctx: click.Context, port: int | None, host: str | None) -> int:
    """Serve the API wrapper (normally started by `comfy-worker run`)."""
    return serve_wrapper(app.settings(ctx), port, host)
