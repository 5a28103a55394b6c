"""`comfy-worker gpu`: NVML read directly, judged by the daemon's policy, with exit codes."""

from __future__ import annotations

import json

from click.testing import CliRunner

from supervisor.commands.cli import main


def run(tmp_path, monkeypatch, description, *args):
    source = tmp_path / "gpus.json"
    source.write_text(json.dumps(description))
    monkeypatch.setenv("GPU_FAKE_SOURCE", str(source))
    return CliRunner().invoke(main, ["gpu", "--seconds", "0.6", "--interval", "0.2", *args])


def test_healthy_gpu_reports_window_telemetry(tmp_path, monkeypatch):
    result = run(tmp_path, monkeypatch, {"gpus": [{"preset": "h100_sxm", "power_w": 400}]},
                 "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["verdict"]["level"] == "ok"
    (tele,) = data["window"]["gpus"]
    assert tele["samples"] >= 2 and tele["mean_power_w"] == 400.0
    assert data["snapshot"]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"


def test_xid_79_is_unhealthy_with_exit_code_2(tmp_path, monkeypatch):
    result = run(tmp_path, monkeypatch, {"gpus": [{"preset": "h100_sxm"}],
                                         "events": [{"gpu": 0, "xid": 79}]})
    assert result.exit_code == 2
    assert "UNHEALTHY" in result.output and "XID 79" in result.output


def test_power_capped_is_degraded_with_exit_code_1(tmp_path, monkeypatch):
    result = run(tmp_path, monkeypatch, {"gpus": [{"preset": "h100_sxm",
                                                   "power_limit_w": 350}]})
    assert result.exit_code == 1, result.output
    assert "power capped" in result.output
