"""`comfy-worker health`: the operator's report, from the running daemon or from the host itself.

It asks the daemon over the admin socket (``GET /status``) and prints the verdict first, then the
GPUs, ComfyUI and the wrapper, the queue, the last benchmark and recent events. When the daemon
cannot be asked it still reads what it can directly (NVML, a ComfyUI process left running),
says that the daemon is down and exits 3.

Exit codes, for monitoring (Nagios style): 0 healthy, 1 degraded, 2 unhealthy, 3 unknown (the
daemon is not reachable, or a setting or an option is wrong: no verdict).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
import psutil

from api.comfy.flags import main_scripts
from config import Settings
from supervisor.commands import app
from supervisor.commands.admin_socket import ask, locate
from supervisor.commands.app import DaemonUnreachable
from supervisor.commands.report import Health, HealthReport, render_json, render_table
from supervisor.gpu import GpuPolicyThresholds, evaluate, read_local_snapshot

#: Seconds to wait for NVML when reading it directly; a GPU in a bad state can hang the driver.
LOCAL_GPU_TIMEOUT = 10.0
DEFAULT_WATCH_SECONDS = 2.0


# --- what the host shows without the daemon -------------------------------------------------------
def read_local_gpu(settings: Settings, timeout: float = LOCAL_GPU_TIMEOUT) -> dict[str, Any]:
    """One NVML reading judged by the same policy as the daemon's, shaped like its gpu section.

    Runs NVML in a daemon thread with a deadline: a wedged driver must not hang a health check.
    """
    result: dict[str, Any] = {}

    def read() -> None:
        try:
            result["snapshot"] = read_local_snapshot(fake_source=settings.gpu.fake_source)
        except Exception as exc:  # the report must still print; say what broke instead
            result["error"] = f"{exc.__class__.__name__}: {exc}"

    thread = threading.Thread(target=read, name="health-nvml", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return _gpu_unread(f"NVML did not answer within {timeout:g} s", settings)
    if "error" in result:
        return _gpu_unread(result["error"], settings)
    snapshot = result["snapshot"]
    g = settings.gpu
    verdict = evaluate(snapshot, (), required=g.required,
                       thresholds=GpuPolicyThresholds(temp_margin_c=g.temp_margin_c,
                                                      power_cap_ratio=g.power_cap_ratio,
                                                      pcie_busy_util_pct=g.busy_utilization))
    return {"verdict": verdict.to_dict(), "required": g.required,
            "snapshot": snapshot.to_dict(), "events": [],
            "source": str(g.fake_source) if g.fake_source else "nvml"}


def _gpu_unread(error: str, settings: Settings) -> dict[str, Any]:
    return {"verdict": {"level": "unknown", "reasons": [], "notes": []},
            "required": settings.gpu.required, "snapshot": None, "error": error}


def find_comfyui(settings: Settings) -> dict[str, Any]:
    """ComfyUI processes on this host: the configured command, or a main.py run in its folder.

    While the daemon is down nothing supervises them; an orphan holding the GPU and the port is
    a common reason why a restarted daemon cannot bring ComfyUI up.
    """
    # Only when the daemon is down: asking a running daemon needs none of the ComfyUI client.
    from supervisor.instances.plan import fixed_prefix

    # A templated command (one instance per GPU) is compared up to its first placeholder.
    command = fixed_prefix([str(part) for part in settings.comfyui.command])
    cwd = Path(settings.comfyui.cwd).resolve() if settings.comfyui.cwd else None
    found = []
    me = os.getpid()
    try:
        for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
            try:
                if proc.pid == me:
                    continue
                cmdline = proc.info.get("cmdline") or []
                if not _looks_like_comfyui(proc, cmdline, command, cwd):
                    continue
                created = proc.info.get("create_time")
                found.append({"pid": proc.pid, "cmdline": cmdline,
                              "uptime_s": round(time.time() - created, 1) if created else None})
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
    except psutil.Error as exc:
        return {"processes": found, "error": str(exc)}
    return {"processes": found}


def _looks_like_comfyui(proc: psutil.Process, cmdline: list[str], command: list[str],
                        cwd: Path | None) -> bool:
    # The interpreter path may be spelt differently (a venv link, python vs python3), so the
    # configured command is compared from its second word on.
    if len(command) > 1 and cmdline[1:len(command)] == command[1:]:
        return True
    scripts = main_scripts(cmdline[1:])
    if not scripts or cwd is None:
        return False
    for script in scripts:
        if Path(script).is_absolute() and Path(script).parent == cwd:
            return True
    try:
        return Path(proc.cwd()).resolve() == cwd
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
        return False


# --- building one report --------------------------------------------------------------------------
def build_report(settings: Settings, socket: Path, timeout: float) -> HealthReport:
    try:
        status = ask(socket, "GET", "/status", timeout=timeout)
    except DaemonUnreachable as exc:
        return HealthReport.daemon_down(str(exc), str(socket), gpu=read_local_gpu(settings),
                                        comfyui=find_comfyui(settings))
    return HealthReport.from_daemon(status, str(socket))


def _use_colour(ctx: click.Context) -> bool:
    """Whether to add colour codes at all; click.echo then strips them unless on a terminal."""
    if ctx.color is not None:
        return ctx.color
    return "NO_COLOR" not in os.environ


@app.verdict_command("health")
@click.option("--json", "as_json", is_flag=True,
              help="Print the snapshot as JSON (one line per refresh with --watch).")
@click.option("--logs", is_flag=True, help="Show the last log lines of ComfyUI and the wrapper.")
@click.option("--watch", type=click.FloatRange(min=0.2), is_flag=False,
              flag_value=DEFAULT_WATCH_SECONDS, default=None, metavar="[SECONDS]",
              help=f"Refresh every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), default=None,
              help="Admin socket of the daemon (default: worker.admin_socket).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              metavar="SECONDS",
              help="Seconds to wait for the daemon's answer.")
@click.pass_context
def health(ctx: click.Context, as_json: bool, logs: bool, watch: float | None,
           socket_path: str | None, timeout: float) -> Health:
    """Report the worker's health: GPU, ComfyUI, the wrapper, queue, benchmark, events.

    Exit codes: 0 healthy, 1 degraded, 2 unhealthy, 3 unknown (the daemon is not reachable; what
    the host shows directly is printed instead).
    """
    if not logging.getLogger().handlers:
        # A CLI run: the report says everything; library warnings would only repeat it on stderr.
        logging.basicConfig(level=logging.ERROR, format="comfy-worker health: %(message)s")
    settings = app.settings(ctx)
    socket = locate(settings, socket_path)
    colour = _use_colour(ctx)
    tty = sys.stdout.isatty()
    code = Health.UNKNOWN
    first = True
    try:
        while True:
            report = build_report(settings, socket, timeout)
            code = report.health
            if as_json:
                text = render_json(report, indent=None if watch is not None else 2) + "\n"
            else:
                text = render_table(report, logs=logs, color=colour,
                                    history=watch is not None)
                if watch is not None:
                    stamp = time.strftime("%H:%M:%S", time.localtime(report.taken_at))
                    text = f"every {watch:g} s, Ctrl-C stops; {stamp}\n" + text
            if watch is not None and not as_json:
                if tty:
                    click.clear()
                elif not first:
                    click.echo("")
            click.echo(text, nl=False, color=ctx.color)
            first = False
            if watch is None:
                break
            time.sleep(watch)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends --watch; the exit code is that of the last report
    return code


if __name__ == "__main__":  # pragma: no cover - `python -m supervisor.commands.health_cli`
    health()
