"""End to end: a GPU that overheats takes the worker out of service and back, with no GPU.

The daemon reads its GPUs from a fake NVML file (GPU_FAKE_SOURCE), sampled every 0.2 s; the test
edits the file the way a real board would change: a healthy H100, then HW thermal slowdown, then
cool again. What a user sees is checked at the public port (/health, /generate/sync), at /metrics
and with `comfy-worker health`.

The health policy (supervisor/gpu/policy.py) calls a GPU within a few degrees of its slowdown
temperature *degraded* (still serving); an active HW thermal slowdown is *unhealthy* (503).
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from supervisor.commands.health_cli import health
from tests.support.procs import get_json, start_daemon, wait_until
from tests.support.workflows import tiny_workflow

pytestmark = pytest.mark.e2e

HEALTHY = {"gpus": [{"preset": "h100_sxm"}]}
TINY = tiny_workflow("g")


def warm(temperature: int) -> dict:
    return {"gpus": [{"preset": "h100_sxm", "temperature_c": temperature, "gpu_util_pct": 100}]}


def throttling(temperature: int) -> dict:
    return {"gpus": [{"preset": "h100_sxm", "temperature_c": temperature, "power_w": 520,
                      "sm_clock_mhz": 1350, "gpu_util_pct": 100,
                      "clock_event_reasons": ["hw_thermal_slowdown"]}]}


def write_gpus(path: Path, description: dict) -> None:
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps(description))
    os.replace(scratch, path)


def health_state(url: str, state: str):
    status, body = get_json(url + "/health")
    return (status, body) if body.get("state") == state else None


def gpu_temperature(url: str) -> float | None:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    match = re.search(r'^comfy_worker_gpu_temperature_celsius\{gpu="0"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else None


def generate_raw(worker) -> tuple[int, dict, dict]:
    request = urllib.request.Request(
        worker.url + "/generate/sync", data=json.dumps({"input": {"workflow_json": TINY}}).encode(),
        method="POST", headers={"Content-Type": "application/json",
                                "Authorization": f"Bearer {worker.token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


def test_thermal_slowdown_takes_the_worker_out_and_back(tmp_path):
    fake = tmp_path / "gpus.json"
    write_gpus(fake, HEALTHY)
    env = {"GPU_FAKE_SOURCE": str(fake), "GPU_REQUIRED": "true", "GPU_SAMPLE_INTERVAL": "0.2"}
    with start_daemon(tmp_path, "--step-seconds", "0.01", extra_env=env) as worker:
        status, body = get_json(worker.url + "/health")
        assert status == 200 and body["state"] == "ready", body
        assert body["gpu"]["verdict"]["level"] == "ok"
        assert wait_until(lambda: gpu_temperature(worker.metrics_url) == 38.0, 10, "the 38 °C gauge")

        # Warm, 3 °C under the slowdown temperature: still serving, /health says why it is degraded.
        write_gpus(fake, warm(87))
        status, body = wait_until(lambda: health_state(worker.url, "degraded"), 10, "degraded")
        assert status == 200
        assert "GPU 0: 87 °C, within 5 °C of slowdown at 90 °C" in body["reason"]

        # HW thermal slowdown at 91 °C: out of service, with the reason.
        write_gpus(fake, throttling(91))
        status, body = wait_until(lambda: health_state(worker.url, "unhealthy"), 10, "unhealthy")
        assert status == 503
        assert "GPU 0: HW thermal slowdown at 91 °C (slowdown at 90 °C)" in body["reason"]
        code, headers, answer = generate_raw(worker)
        assert code == 503 and headers.get("Retry-After"), (code, headers, answer)
        assert answer["state"] == "unhealthy" and "HW thermal slowdown" in answer["reason"]
        assert wait_until(lambda: gpu_temperature(worker.metrics_url) == 91.0, 10, "the 91 °C gauge")
        report = CliRunner().invoke(health, ["--socket", str(worker.admin_socket)])
        assert report.exit_code == 2, report.output
        assert report.stdout.startswith("UNHEALTHY: GPU 0: HW thermal slowdown")
        assert "91/90" in report.stdout

        # Cool again: back in service, and work goes through.
        write_gpus(fake, HEALTHY)
        status, body = wait_until(lambda: health_state(worker.url, "ready"), 10, "ready again")
        assert status == 200 and body["gpu"]["verdict"]["level"] == "ok"
        code, _, answer = generate_raw(worker)
        assert code == 200 and answer["status"] == "completed", answer
        assert CliRunner().invoke(health, ["--socket", str(worker.admin_socket)]).exit_code == 0
