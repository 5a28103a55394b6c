"""`comfy-worker health` against the real daemon (simulator as ComfyUI, a fake GPU file as NVML).

The command is invoked as the click object (CliRunner) and as a real process; the renderer is
also fed the real daemon's snapshot directly, with parts changed to reach the rarer states.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from supervisor.commands.health_cli import health
from supervisor.commands.report import (
    Health,
    HealthReport,
    judge,
    render_json,
    render_table,
)
from tests.support import procs
from tests.support.procs import ROOT, base_env, start_daemon, wait_until
from tests.support.workflows import tiny_workflow

TINY = tiny_workflow("h")
HEALTHY_H100 = {"gpus": [{"preset": "h100_sxm"}]}
ENTRY = "from supervisor.commands.health_cli import health; health()"


def write_gpus(path: Path, description: dict) -> None:
    """Replace the fake GPU file in one step, so the daemon never reads half of it."""
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps(description))
    os.replace(scratch, path)


def gpu_env(fake: Path) -> dict[str, str]:
    return {"GPU_FAKE_SOURCE": str(fake), "GPU_REQUIRED": "true", "GPU_SAMPLE_INTERVAL": "0.2"}


def invoke(*args: str, color: bool = False, env: dict | None = None):
    return CliRunner().invoke(health, list(args), color=color, env=env)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """One healthy worker for the read-only tests; it has served one request."""
    tmp = tmp_path_factory.mktemp("health")
    fake = tmp / "gpus.json"
    write_gpus(fake, HEALTHY_H100)
    with start_daemon(tmp, "--step-seconds", "0.01", extra_env=gpu_env(fake)) as daemon:
        status, body = daemon.generate({"input": {"workflow_json": TINY}})
        assert status == 200, body
        yield daemon


@pytest.mark.e2e
def test_table_puts_the_verdict_first_then_gpu_processes_queue(worker):
    result = invoke("--socket", str(worker.admin_socket))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("HEALTHY: ComfyUI and the wrapper are ready\n")
    assert "\x1b[" not in out  # no colour when the output is not a terminal
    gpu_row = next(line for line in out.splitlines() if "H100 80GB HBM3" in line)
    for cell in ("38/90", "120/700", "1980/1980", "none", "0/0", "Gen5 x16 (Gen5 x16)"):
        assert cell in gpu_row, gpu_row
    status = worker.status()
    comfy_row = next(line for line in out.splitlines() if line.strip().startswith("ComfyUI"))
    assert " ready " in comfy_row and str(status["children"]["comfyui"]["pid"]) in comfy_row
    assert "requests: 1 served, 0 failed" in out
    assert "BENCHMARK  disabled" in out
    assert "| " not in out  # log lines only with --logs


@pytest.mark.e2e
def test_logs_shows_the_childrens_last_lines(worker):
    result = invoke("--socket", str(worker.admin_socket), "--logs")
    assert result.exit_code == 0, result.output
    assert "ComfyUI log, last" in result.stdout
    assert "| Starting server" in result.stdout  # printed by the simulator at start-up
    assert "API wrapper listening on" in result.stdout


@pytest.mark.e2e
def test_json_is_the_daemon_snapshot_with_the_verdict(worker):
    result = invoke("--socket", str(worker.admin_socket), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["health"] == {"verdict": "HEALTHY", "label": "HEALTHY",
                              "reason": "ComfyUI and the wrapper are ready", "exit_code": 0}
    assert data["daemon"]["reachable"] is True
    direct = worker.status()
    assert set(direct) <= set(data)
    assert data["worker"]["pid"] == direct["worker"]["pid"]
    assert data["gpu"]["snapshot"]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert data["queue"]["served"] == {"200": 1.0}


@pytest.mark.e2e
def test_colour_only_when_asked_or_on_a_terminal(worker):
    coloured = invoke("--socket", str(worker.admin_socket), color=True)
    assert coloured.stdout.startswith("\x1b[")  # the verdict is coloured
    assert click.unstyle(coloured.stdout).startswith("HEALTHY: ")


@pytest.mark.e2e
def test_config_comes_from_the_parent_groups_option(worker, tmp_path):
    """Registered under `comfy-worker --config FILE`, the command reads the socket from FILE."""
    @click.group()
    @click.option("--config", "config_path", default=None)
    @click.pass_context
    def main(ctx, config_path):
        ctx.obj = {"config_path": config_path}

    main.add_command(health)
    config = tmp_path / "worker.toml"
    config.write_text(f'[worker]\nadmin_socket = "{worker.admin_socket}"\n')
    env = {"WORKER_ADMIN_SOCKET": None, "COMFY_WORKER_CONFIG": None}
    result = CliRunner().invoke(main, ["--config", str(config), "health"], env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("HEALTHY")
    broken = tmp_path / "broken.toml"
    broken.write_text("[worker]\nport = 'many'\n")
    result = CliRunner().invoke(main, ["--config", str(broken), "health"], env=env)
    assert result.exit_code == 3 and "worker.port" in result.output


@pytest.mark.e2e
def test_watch_refreshes_until_interrupted(worker, tmp_path):
    out_path = tmp_path / "watch.out"
    headline = "HEALTHY: ComfyUI and the wrapper are ready"
    with open(out_path, "w") as out_file:
        process = procs.popen(
            [sys.executable, "-c", ENTRY, "--socket", str(worker.admin_socket), "--watch", "0.3"],
            cwd=ROOT, env=base_env(), stdout=out_file, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: out_path.read_text().count(headline) >= 2, 20, "a second refresh")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err  # Ctrl-C ends the watch with the last verdict's code
    out = out_path.read_text()
    assert out.count("every 0.3 s, Ctrl-C stops") == out.count(headline)
    assert "\x1b[" not in out  # a file is no terminal: no screen clearing, no colour


@pytest.mark.e2e
def test_renderer_maps_every_worker_state(worker):
    """The table from the real snapshot, with the worker state and parts changed."""
    real = worker.status()
    expected = {"ready": (Health.HEALTHY, "HEALTHY"), "degraded": (Health.DEGRADED, "DEGRADED"),
                "unhealthy": (Health.UNHEALTHY, "UNHEALTHY"),
                "starting": (Health.UNHEALTHY, "UNHEALTHY (starting)"),
                "provisioning": (Health.UNHEALTHY, "UNHEALTHY (provisioning)"),
                "benchmarking": (Health.UNHEALTHY, "UNHEALTHY (benchmarking)"),
                "stopping": (Health.UNHEALTHY, "UNHEALTHY (stopping)"),
                "exploded": (Health.UNKNOWN, "UNKNOWN (exploded)")}
    for state, (verdict, label) in expected.items():
        snap = copy.deepcopy(real)
        snap["worker"].update(state=state, reason=f"because {state}")
        assert judge(snap)[:2] == (verdict, label)
        text = render_table(HealthReport.from_daemon(snap, "/x.sock"))
        assert text.startswith(f"{label}: because {state}\n")
    assert judge({"no": "worker"})[0] is Health.UNKNOWN

    snap = copy.deepcopy(real)
    snap["worker"].update(state="unhealthy",
                          reason="ComfyUI failed: crash loop; GPU 0: XID 79 (fallen off)")
    comfy = snap["children"]["comfyui"]
    comfy.update(state="failed", reason="crash loop: 5 exits in 60 s", restarts=5,
                 last_exit={"code": None, "signal": "SIGKILL", "at": time.time() - 30,
                            "description": "killed by SIGKILL (perhaps out of memory?)"})
    snap["gpu"]["events"] = [{"time": time.time() - 5, "monotonic": 1.0, "gpu_index": 0,
                              "kind": "xid", "xid": 79, "meaning": "GPU has fallen off the bus",
                              "severity": "critical"}]
    snap["benchmark"] = {"status": "slow", "reason": "benchmark: 40% slower than expected",
                         "max_perf": 0.125, "its": 9.5, "causes": ["HW thermal slowdown"],
                         "timestamp": time.time() - 60}
    text = render_table(HealthReport.from_daemon(snap, "/x.sock"))
    lines = text.splitlines()
    assert lines[:3] == ["UNHEALTHY: 2 problems", "  * ComfyUI failed: crash loop",
                         "  * GPU 0: XID 79 (fallen off)"]
    comfy_row = next(line for line in lines if line.strip().startswith("ComfyUI  "))
    assert "failed" in comfy_row and "killed by SIGKILL (perhaps out of memory?) (30 s ago)" \
        in comfy_row
    assert "  ComfyUI: crash loop: 5 exits in 60 s" in lines
    assert any("GPU 0" in line and "XID 79: GPU has fallen off the bus [critical]" in line
               for line in lines)
    assert "BENCHMARK  slow: benchmark: 40% slower than expected" in lines
    assert any("max_perf 0.125 req/s" in line for line in lines)
    assert "  - HW thermal slowdown" in lines
    data = json.loads(render_json(HealthReport.from_daemon(snap, "/x.sock")))
    assert data["health"]["exit_code"] == 2 and data["children"]["comfyui"]["restarts"] == 5


@pytest.mark.e2e
def test_exit_codes_follow_the_gpu(tmp_path):
    """0 healthy; 1 once the fake GPU is power capped; 2 after an XID 79."""
    fake = tmp_path / "gpus.json"
    write_gpus(fake, HEALTHY_H100)
    with start_daemon(tmp_path, "--step-seconds", "0.01", extra_env=gpu_env(fake)) as daemon:
        sock = str(daemon.admin_socket)
        assert invoke("--socket", sock).exit_code == 0

        write_gpus(fake, {"gpus": [{"preset": "h100_sxm", "power_limit_w": 500,
                                    "clock_event_reasons": ["sw_power_cap"]}]})
        result = wait_until(lambda: (r := invoke("--socket", sock)).exit_code == 1 and r, 15,
                            "the report to turn degraded")
        assert result.stdout.startswith("DEGRADED: GPU 0: power capped at 500 W (default 700 W)")
        assert "120/500 (default 700)" in result.stdout and "SW power cap" in result.stdout

        write_gpus(fake, {"gpus": [{"preset": "h100_sxm"}], "events": [{"gpu": 0, "xid": 79}]})
        result = wait_until(lambda: (r := invoke("--socket", sock)).exit_code == 2 and r, 15,
                            "the report to turn unhealthy")
        assert result.stdout.startswith("UNHEALTHY: GPU 0: XID 79")
        assert "XID 79: GPU has fallen off the bus [critical]" in result.stdout  # in EVENTS
        assert json.loads(invoke("--socket", sock, "--json").stdout)["health"]["exit_code"] == 2


@pytest.mark.real_processes
def test_daemon_down_prints_the_local_gpu_and_comfyui_and_exits_3(tmp_path):
    """A real process, no daemon: NVML (the fake file) is read directly, an orphan ComfyUI is
    found by its folder, and the socket comes from the settings."""
    fake = tmp_path / "gpus.json"
    write_gpus(fake, {"gpus": [{"preset": "h100_sxm", "temperature_c": 91,
                                "clock_event_reasons": ["hw_thermal_slowdown"]}]})
    comfy_dir = tmp_path / "ComfyUI"
    comfy_dir.mkdir()
    (comfy_dir / "main.py").write_text("import time\ntime.sleep(60)\n")
    orphan = procs.popen([sys.executable, "main.py", "--port", "18188"], cwd=comfy_dir)
    env = base_env(GPU_FAKE_SOURCE=str(fake), COMFYUI_CWD=str(comfy_dir),
                   WORKER_ADMIN_SOCKET=str(tmp_path / "admin.sock"))
    try:
        run = procs.run([sys.executable, "-c", ENTRY], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=30)
        as_json = procs.run([sys.executable, "-c", ENTRY, "--json"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    finally:
        orphan.kill()
        orphan.wait()
    assert run.returncode == 3, run.stderr
    out = run.stdout
    assert out.startswith(f"UNKNOWN: the daemon is not running (no admin socket at "
                          f"{tmp_path / 'admin.sock'})")
    assert "daemon: DOWN" in out
    assert "H100 80GB HBM3" in out and "91/90" in out and "HW thermal slowdown" in out
    assert "! GPU 0: HW thermal slowdown at 91 °C (slowdown at 90 °C)" in out
    comfy_line = next(line for line in out.splitlines() if line.strip().startswith(str(orphan.pid)))
    assert "main.py --port 18188" in comfy_line
    assert run.stderr == ""
    assert as_json.returncode == 3
    data = json.loads(as_json.stdout)
    assert data["daemon"]["reachable"] is False and data["health"]["exit_code"] == 3
    assert data["gpu"]["verdict"]["level"] == "unhealthy"
    assert [p["pid"] for p in data["comfyui"]["processes"]] == [orphan.pid]


def test_stale_socket_is_reported_as_a_stopped_daemon(tmp_path):
    path = tmp_path / "admin.sock"
    with socket.socket(socket.AF_UNIX) as listener:  # bound, never listening: like a dead daemon
        listener.bind(str(path))
    fake = tmp_path / "gpus.json"
    write_gpus(fake, {"nvml_error": "driver_not_loaded"})
    result = invoke("--socket", str(path), env={"GPU_FAKE_SOURCE": str(fake),
                                                "GPU_REQUIRED": "true"})
    assert result.exit_code == 3, result.output
    assert "refuses connections: a stale socket" in result.stdout.splitlines()[0]
    assert "NVML no_driver" in result.stdout
    assert "! no NVIDIA driver/NVML" in result.stdout
