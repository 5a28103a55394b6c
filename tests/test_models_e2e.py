"""Model provisioning inside the real daemon: a manifest, a local file server, the simulator."""

from __future__ import annotations

import hashlib
import os
import urllib.request

import pytest
from click.testing import CliRunner

from tests.support.bench import NOT_JUDGED
from tests.support.fileserver import FileServer
from tests.support.procs import get_json, start_daemon, wait_until

pytestmark = pytest.mark.e2e

MODEL = os.urandom(4 * 1024 * 1024)
SHA = hashlib.sha256(MODEL).hexdigest()


def metric(worker, name: str) -> float | None:
    with urllib.request.urlopen(worker.metrics_url + "/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def manifest(tmp_path, url: str, sha256: str = SHA) -> str:
    path = tmp_path / "models.toml"
    path.write_text(f'[[models]]\nurl = "{url}"\npath = "checkpoints/sd15.safetensors"\n'
                    f'sha256 = "{sha256}"\n')
    return str(path)


def test_before_ready_model_provisions_then_benchmarks_then_ready(tmp_path):
    with FileServer(files={"sd15.safetensors": MODEL}, chunk_delay=0.06) as server:
        env = {"MODELS_MANIFEST": manifest(tmp_path, f"{server.url}/sd15.safetensors"),
               "BENCHMARK_ENABLED": "true", "BENCHMARK_CHECKPOINT": "sd15.safetensors",
               "BENCHMARK_TEST_WIDTH": "64", "BENCHMARK_TEST_HEIGHT": "64",
               "BENCHMARK_TEST_STEPS": "4", "BENCHMARK_RUNS": "1",
               **NOT_JUDGED}
        # The simulator offers no checkpoint of its own: the benchmark needs the downloaded one.
        with start_daemon(tmp_path, "--checkpoints", "other.safetensors", "--step-seconds",
                          "0.1", wait_ready=False, extra_env=env) as worker:
            def downloading():
                status, body = get_json(worker.url + "/health")
                if body.get("state") == "provisioning" and " MB" in body.get("reason", ""):
                    return status, body
                return None
            status, body = wait_until(downloading, 30, "provisioning with progress")
            assert status == 503
            assert body["reason"].startswith("downloading 1 of 1 models: sd15 ")
            assert body["models"]["status"] == "provisioning"
            assert body["models"]["total_bytes"] == len(MODEL)
            assert metric(worker, "comfy_worker_models_size_bytes") in (0, len(MODEL))
            wait_until(lambda: metric(worker, "comfy_worker_models_size_bytes") == len(MODEL),
                       10, "the size in /metrics")
            status, body = wait_until(
                lambda: (lambda r: r if r[1].get("state") in ("ready", "unhealthy") else None)(
                    get_json(worker.url + "/health")), 60, "the worker to settle")
            assert (status, body["state"]) == (200, "ready"), body
            states = [h["state"] for h in worker.status()["worker"]["history"]]
            assert states.index("provisioning") < states.index("benchmarking") \
                < states.index("ready")
            assert worker.status()["benchmark"]["status"] == "no_reference"  # it ran, found the model
            placed = tmp_path / "comfy/models/checkpoints/sd15.safetensors"
            assert hashlib.sha256(placed.read_bytes()).hexdigest() == SHA
            # `comfy-worker health` shows the same.
            from supervisor.commands.cli import main
            result = CliRunner().invoke(main, ["health", "--socket", str(worker.admin_socket)])
            assert "MODELS" in result.output and "checkpoints/sd15.safetensors" in result.output
        # A restart finds the file verified (no second download, no re-hash).
        count = len(server.seen)
        with start_daemon(tmp_path, "--checkpoints", "other.safetensors",
                          extra_env={**env, "BENCHMARK_ENABLED": "false"}) as worker:
            assert worker.status()["models"]["files"][0]["verified"] == "verified"
        assert len(server.seen) == count


def test_missing_model_makes_the_worker_unhealthy_until_the_source_has_it(tmp_path):
    with FileServer() as server:
        env = {"MODELS_MANIFEST": manifest(tmp_path, f"{server.url}/sd15.safetensors"),
               "MODELS_RETRIES": "0", "MODELS_BACKOFF_INITIAL": "0.3",
               "MODELS_BACKOFF_MAX": "0.5"}
        with start_daemon(tmp_path, wait_ready=False, extra_env=env) as worker:
            def failing():
                status, body = get_json(worker.url + "/health")
                return (status, body) if body.get("state") == "unhealthy" else None
            status, body = wait_until(failing, 30, "the worker to report the failure")
            assert status == 503
            reason = body["reason"]
            assert "checkpoints/sd15.safetensors" in reason
            assert f"{server.url}/sd15.safetensors" in reason and "HTTP 404" in reason
            assert "next try at" in reason
            wait_until(lambda: (metric(worker, "comfy_worker_model_download_failures_total")
                                or 0) >= 1, 10, "the failure in /metrics")
            server.files["sd15.safetensors"] = MODEL
            wait_until(lambda: get_json(worker.url + "/health")[0] == 200, 30,
                       "the worker to be ready once the source has the file")
            assert worker.status()["models"]["failures"] >= 1
