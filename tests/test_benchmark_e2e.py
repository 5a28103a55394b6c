"""The start-up benchmark inside the real daemon, with the simulator as ComfyUI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.support.bench import NOMINAL, NOT_JUDGED, STEP_SECONDS, bench_env, full_speed, settled
from tests.support.procs import start_daemon

pytestmark = pytest.mark.e2e


def test_node_25_percent_slow_is_flagged_and_refused(tmp_path):
    # Expected: the nominal time, the least a run can take; a busy machine only adds to the ratio.
    with start_daemon(tmp_path, "--step-seconds", str(STEP_SECONDS), "--slow-factor", "1.25",
                      wait_ready=False, extra_env=bench_env()) as worker:
        status, body = settled(worker)
        assert status == 503 and body["state"] == "unhealthy"
        assert "slower than expected" in body["reason"]
        bench = worker.status()["benchmark"]
        assert bench["status"] == "slow" and bench["ratio"] > 1.2
        answer = worker.generate({"input": {"modifier": "Text2Image"}})
        assert answer[0] == 503 and "slower than expected" in answer[1]["reason"]


@pytest.mark.slow  # two daemons: the reference, then the slow node
def test_node_10_percent_slow_passes_and_reports_max_perf(tmp_path):
    # Expected: what this machine took a moment ago at full speed (the reference table's role).
    reference = full_speed(tmp_path / "reference")
    assert reference["status"] == "no_reference", reference
    (tmp_path / "slow").mkdir()
    with start_daemon(tmp_path / "slow", "--step-seconds", str(STEP_SECONDS), "--slow-factor",
                      "1.10", wait_ready=False,
                      extra_env=bench_env(BENCHMARK_EXPECTED_SECONDS=str(reference["seconds"]))) as worker:
        status, body = settled(worker)
        assert status == 200 and body["state"] == "ready", body
        bench = worker.status()["benchmark"]
        assert bench["status"] == "pass"
        assert 1.05 < bench["ratio"] < 1.2, (bench["seconds"], reference["seconds"])
        assert abs(bench["max_perf"] - 1 / bench["seconds"]) < 1e-6
        assert abs(reference["its"] / bench["its"] - 1.10) < 0.1, (bench["its"], reference["its"])


def test_report_action_serves_while_degraded(tmp_path):
    env = bench_env(BENCHMARK_ACTION="report")
    with start_daemon(tmp_path, "--step-seconds", str(STEP_SECONDS), "--slow-factor", "1.3",
                      wait_ready=False, extra_env=env) as worker:
        status, body = settled(worker)
        assert status == 200 and body["state"] == "degraded"
        assert "slower than expected" in body["reason"]


def test_throttling_gpu_during_the_run_is_named_as_cause(tmp_path):
    source = tmp_path / "gpus.json"
    # A software thermal slowdown: the GPU is degraded, still serving, and the benchmark runs.
    source.write_text(json.dumps({"gpus": [{"preset": "h100_sxm", "temperature_c": 88,
                                            "clock_event_reasons": ["sw_thermal_slowdown"]}]}))
    env = bench_env(GPU_FAKE_SOURCE=str(source), GPU_REQUIRED="true", GPU_SAMPLE_INTERVAL="0.2")
    with start_daemon(tmp_path, "--step-seconds", str(STEP_SECONDS), "--slow-factor", "1.4",
                      wait_ready=False, extra_env=env) as worker:
        status, body = settled(worker)
        assert status == 503
        causes = " ".join(worker.status()["benchmark"]["causes"]).lower()
        assert "thermal" in causes


def test_missing_checkpoint_gives_a_clear_error(tmp_path):
    with start_daemon(tmp_path, "--checkpoints", "other.safetensors", wait_ready=False,
                      extra_env=bench_env()) as worker:
        status, body = settled(worker)
        assert status == 503
        assert "v1-5-pruned-emaonly.safetensors" in body["reason"]
        assert "checkpoints" in body["reason"]


@pytest.mark.slow
def test_cached_result_is_reused_after_restart_and_rerun_after_change(tmp_path):
    args = ("--step-seconds", str(STEP_SECONDS))
    with start_daemon(tmp_path, *args, wait_ready=False, extra_env=bench_env()) as worker:
        assert settled(worker)[0] == 200
        first = worker.status()["benchmark"]
        assert first["from_cache"] is False
    with start_daemon(tmp_path, *args, wait_ready=False, extra_env=bench_env()) as worker:
        assert settled(worker)[0] == 200
        second = worker.status()["benchmark"]
        assert second["from_cache"] is True
        assert second["timestamp"] == first["timestamp"]
    changed = bench_env(BENCHMARK_TEST_STEPS="10", BENCHMARK_EXPECTED_SECONDS=str(NOMINAL / 2))
    with start_daemon(tmp_path, *args, wait_ready=False, extra_env=changed) as worker:
        assert settled(worker)[0] == 200
        third = worker.status()["benchmark"]
        assert third["from_cache"] is False and third["params"]["steps"] == 10
    history = (tmp_path / "state" / "benchmark" / "history.jsonl").read_text().splitlines()
    assert len(history) >= 2


def test_benchmark_command_reruns_through_the_daemon(tmp_path, monkeypatch):
    from supervisor.commands.cli import main

    # Speed is not what this is about (the rerun is): nothing to compare with, no verdict on it.
    with start_daemon(tmp_path, "--step-seconds", "0.02", wait_ready=False,
                      extra_env=bench_env(**NOT_JUDGED)) as worker:
        assert settled(worker)[0] == 200
        monkeypatch.setenv("WORKER_ADMIN_SOCKET", str(worker.admin_socket))
        result = CliRunner().invoke(main, ["benchmark", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["status"] == "no_reference" and report["from_cache"] is False
        assert report["seconds"] > 0
        result = CliRunner().invoke(main, ["benchmark"])
        assert result.exit_code == 0
        assert "no_reference" in result.output and "it/s" in result.output
