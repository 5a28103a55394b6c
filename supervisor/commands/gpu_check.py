"""`comfy-worker gpu`: read the GPUs straight from NVML for a few seconds and judge them.

No daemon needed: it runs the same reader, XID watcher, sampler and policy the daemon runs, so an
operator (or a one-off check on a new host) sees exactly what the worker would decide, with the
telemetry of the sampling window. The exit status is the verdict: 0 ok, 1 degraded, 2 unhealthy,
3 unknown (no verdict: a setting or an option is wrong).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import click

from config import Settings
from config.logsetup import setup_logging
from supervisor.commands import app
from supervisor.commands.app import Verdict
from supervisor.gpu.model import HealthLevel
from supervisor.gpu.monitor import GpuMonitor

#: The GPU policy's level -> the command's verdict.
LEVEL_VERDICT = {HealthLevel.OK: Verdict.HEALTHY, HealthLevel.DEGRADED: Verdict.DEGRADED,
                 HealthLevel.UNHEALTHY: Verdict.UNHEALTHY}
from supervisor.gpu.handin import advice, look


async def collect(settings: Settings, seconds: float, interval: float) -> dict[str, Any]:
    monitor = GpuMonitor(settings)
    await monitor.start()
    began = time.monotonic()
    try:
        while time.monotonic() - began < seconds:
            await asyncio.sleep(interval)
            await monitor.sampler.sample_once()
        window = monitor.window(began)
        snapshot = monitor.snapshot()
        snapshot["window"] = window.to_dict()
        snapshot["nvml"] = monitor.reader.status().to_dict()
        if not settings.gpu.fake_source:
            seen = await asyncio.to_thread(look)
            snapshot["hand_in"] = {**seen.to_dict(), "advice": advice(seen)}
        return snapshot
    finally:
        await monitor.stop()


@app.verdict_command("gpu")
@click.option("--seconds", type=float, default=3.0, show_default=True,
              help="How long to sample.")
@click.option("--interval", type=float, default=0.5, show_default=True,
              help="Seconds between samples.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def gpu(ctx: click.Context, seconds: float, interval: float, as_json: bool) -> Verdict:
    """Read the GPUs through NVML (no daemon needed) and print the verdict and telemetry."""
    settings = app.settings(ctx)
    setup_logging("ERROR", settings.secrets())  # the verdict says it all; no log noise
    data = asyncio.run(collect(settings, seconds, interval))
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        verdict = data["verdict"]
        click.echo(f"GPU verdict: {verdict['level'].upper()}")
        for line in verdict["reasons"] + verdict["notes"]:
            click.echo(f"  - {line}")
        hint = (data.get("hand_in") or {}).get("advice")
        if hint:
            click.echo(f"  - {hint}")
        snap = data.get("snapshot") or {}
        for record in snap.get("gpus", []):
            temp = (record.get("temperature") or {}).get("current_c")
            power = (record.get("power") or {}).get("draw_w")
            click.echo(f"GPU {record.get('index')}: {record.get('name')} "
                       f"{temp} °C, {power} W, state {record.get('state')}")
        for tele in data["window"]["gpus"]:
            click.echo(f"  window: {tele['samples']} samples, mean {tele['mean_temperature_c']} °C "
                       f"(peak {tele['peak_temperature_c']}), mean {tele['mean_power_w']} W, "
                       f"SM {tele['mean_sm_clock_mhz']} MHz, reasons "
                       f"{', '.join(tele['reasons_seen']) or 'none'}, "
                       f"energy {tele['energy_j']} J")
        click.echo(f"  XID watch: {data['event_watch']}")
    return LEVEL_VERDICT[HealthLevel(data["verdict"]["level"])]
