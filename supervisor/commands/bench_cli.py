"""`comfy-worker benchmark`: run the benchmark now, through the daemon or straight at ComfyUI.

Through the daemon, the run is the daemon's own (same path as real requests, same cache and
history); this command asks for it over the admin socket and follows its progress. With
`--comfyui-url` no daemon is needed: the graph goes straight to that ComfyUI. The exit status is
the verdict of the report (of the worst instance on a multi-GPU host): 0 pass, 1 slow, 2 error,
3 no report (the daemon is not reachable, or refused the run).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from api.comfy import folders as comfy_folders
from benchmark import (
    BenchmarkReport,
    ComfyTarget,
    NullTelemetry,
    render_progress,
    render_report,
    run_benchmark,
)
from config import Settings
from config.logsetup import setup_logging
from supervisor.commands import app
from supervisor.commands.admin_socket import locate, request
from supervisor.commands.app import Verdict

NOT_REACHABLE_HINT = "; use --comfyui-url to run straight against a ComfyUI"


def verdict(report: BenchmarkReport) -> Verdict:
    if report.status.value == "error":
        return Verdict.UNHEALTHY
    if report.status.value == "slow":
        return Verdict.DEGRADED
    return Verdict.HEALTHY


def _show_progress(text: str, interactive: bool) -> None:
    if interactive:
        click.echo("\r" + text.ljust(78), nl=False, err=True)


def _benchmarks(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Each instance's benchmark (one on a one-GPU host)."""
    instances = status.get("instances") or []
    if len(instances) > 1:
        return [{**i.get("benchmark", {}), "instance": i.get("instance"),
                 "instance_label": i.get("label")} for i in instances]
    return [status.get("benchmark", {})]


async def _through_daemon(socket: Path, interactive: bool) -> list[dict[str, Any]]:
    """Ask for a run on every instance and follow it; each instance's report body."""
    answer = await request(socket, "POST", "/benchmark")
    if not answer.get("ok"):
        raise app.Failed(str(answer.get("message", "the daemon refused the benchmark")))
    seen_running = False
    while True:
        await asyncio.sleep(0.5)
        status = await request(socket, "GET", "/status")
        benches = _benchmarks(status)
        running = [b for b in benches if b.get("running")]
        if running:
            seen_running = True
            if "progress" in running[0]:
                more = f" (+{len(running) - 1} more)" if len(running) > 1 else ""
                _show_progress(running[0]["progress"]["text"] + more, interactive)
        elif seen_running or all(b.get("status") != "pending" for b in benches):
            if all(b.get("status") != "pending" for b in benches):
                if interactive:
                    click.echo("", err=True)
                return benches
        else:
            _show_progress(f"waiting: {status['worker']['reason']}", interactive)


async def _direct(settings: Settings, url: str, output_dir: Path, interactive: bool
                  ) -> BenchmarkReport:
    def on_progress(progress) -> None:
        _show_progress(render_progress(progress), interactive)

    report = await run_benchmark(ComfyTarget(url, output_dir), settings, NullTelemetry(),
                                 on_progress=on_progress)
    if interactive:
        click.echo("", err=True)
    return report


@app.verdict_command("benchmark")
@click.option("--comfyui-url", default=None,
              help="Run straight against this ComfyUI instead of through the running daemon.")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="ComfyUI's output folder, with --comfyui-url (default: from the settings).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--socket", "socket_path", default=None, help="Admin socket of the daemon.")
@click.pass_context
def benchmark(ctx: click.Context, comfyui_url: str | None, output_dir: str | None,
              as_json: bool, socket_path: str | None) -> Verdict:
    """Run the benchmark now and print seconds, it/s, expected time, verdict and causes."""
    settings = app.settings(ctx)
    setup_logging("WARNING", settings.secrets())
    interactive = sys.stderr.isatty() and not as_json
    started = time.monotonic()
    if comfyui_url:
        folder = Path(output_dir) if output_dir else comfy_folders.from_settings(settings).output.path
        report = asyncio.run(_direct(settings, comfyui_url.rstrip("/"), folder, interactive))
        body = report.to_dict()
    else:
        socket = locate(settings, socket_path)
        try:
            bodies = asyncio.run(_through_daemon(socket, interactive))
        except app.DaemonUnreachable as exc:
            raise app.DaemonUnreachable(f"{exc}{NOT_REACHABLE_HINT}") from None
        if len(bodies) > 1:
            return _several(bodies, as_json, started)
        body = bodies[0]
        report = BenchmarkReport.from_dict(body)
    if as_json:
        click.echo(json.dumps(body, indent=2, default=str))
    else:
        click.echo(render_report(report))
        click.echo(f"(took {time.monotonic() - started:.1f} s)")
    return verdict(report)


def _several(bodies: list[dict[str, Any]], as_json: bool, started: float) -> Verdict:
    """A multi-GPU host: every instance's report; the verdict of the worst."""
    verdicts = [verdict(BenchmarkReport.from_dict(body)) for body in bodies]
    if as_json:
        click.echo(json.dumps({"instances": bodies}, indent=2, default=str))
    else:
        for body in bodies:
            click.echo(f"== {body.get('instance_label')}: {body.get('reason')}")
            click.echo(render_report(BenchmarkReport.from_dict(body)))
        click.echo(f"(took {time.monotonic() - started:.1f} s)")
    return max(verdicts)
