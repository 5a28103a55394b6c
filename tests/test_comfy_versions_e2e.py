"""The daemon against both ComfyUI API versions the simulator speaks: the flags it passes, the
database each instance gets, models read from --models-directory, start-up failures explained.

Each simulator mode accepts exactly its version's flags and exits 2 on any other, as ComfyUI's
argparse does, so an instance that reaches ready was given no flag its version does not know.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from api.comfy.flags import FLAGS_0_3_64, FLAGS_NEWEST
from tests.support.bench import NOT_JUDGED
from tests.support.comfy_modes import NEWEST
from tests.support.fileserver import FileServer
from tests.support.procs import (
    ROOT,
    base_env,
    fake_gpus,
    free_port,
    get_json,
    start_daemon,
    start_multi,
    wait_until,
)
from tests.support.workflows import TINY

pytestmark = pytest.mark.e2e

#: The simulator's own knobs (not ComfyUI flags), as the tests pass them.
SIM_KNOBS = {"--device-type", "--step-seconds"}


def comfyui_argv(url: str) -> list[str]:
    status, stats = get_json(url + "/system_stats")
    assert status == 200
    return [str(a) for a in stats["system"]["argv"][1:]]


def settled(worker) -> tuple[int, dict] | None:
    answer = get_json(worker.url + "/health")
    return answer if answer[1].get("state") in ("ready", "unhealthy") else None


def test_the_default_plan_reaches_ready_with_only_flags_the_version_knows(tmp_path, comfy_api):
    models = tmp_path / "shared-models"
    env = {"COMFYUI_MODELS_DIR": str(models)}
    # The built-in command's own flags, {instance_folders} on two GPUs, comfyui.assets "off" and
    # an explicit models folder: everything that could tempt the worker into a newer flag.
    with start_multi(tmp_path, 2, "--disable-auto-launch", "--step-seconds", "0.01",
                     extra_env=env) as worker:
        status, health = wait_until(lambda: (lambda a: a if a[1].get("state") == "ready"
                                             else None)(get_json(worker.url + "/health")),
                                    60, "both instances ready")
        known = FLAGS_NEWEST if comfy_api == NEWEST else FLAGS_0_3_64
        snapshot = worker.status()
        for instance in snapshot["instances"]:
            argv = comfyui_argv(instance["comfyui_url"])
            flags = {a.partition("=")[0] for a in argv if a.startswith("--")}
            assert flags - SIM_KNOBS <= known, flags - SIM_KNOBS - known
            newest = comfy_api == NEWEST
            assert ("--disable-assets" in argv) is newest, argv
            assert ("--models-directory" in argv) is newest, argv
            assert instance["comfyui_version"] == f"{comfy_api}-sim"
            assert instance["assets"]["mode"] == ("off" if newest else "none")
            assert instance["comfyui_flags"]["exact"]
            assets = get_json(instance["comfyui_url"] + "/__sim__/assets")[1]
            assert assets["enabled"] is False
        assert [i["comfyui_version"] for i in health["instances"]] == [f"{comfy_api}-sim"] * 2
        status, body = worker.generate({"input": {"workflow_json": TINY}})
        assert status == 200 and body["status"] == "completed", body


def test_a_manifest_model_lands_in_the_models_directory_comfyui_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("SIM_API_VERSION", NEWEST)
    model = os.urandom(256 * 1024)
    models = tmp_path / "models-elsewhere"
    models.mkdir()   # ComfyUI refuses a --models-directory that does not exist
    manifest = tmp_path / "models.toml"
    with FileServer(files={"sd15.safetensors": model}) as server:
        manifest.write_text(f'[[models]]\nurl = "{server.url}/sd15.safetensors"\n'
                            f'path = "checkpoints/sd15.safetensors"\n'
                            f'sha256 = "{hashlib.sha256(model).hexdigest()}"\n')
        env = {"MODELS_MANIFEST": str(manifest), "BENCHMARK_ENABLED": "true",
               "BENCHMARK_CHECKPOINT": "sd15.safetensors", "BENCHMARK_TEST_WIDTH": "64",
               "BENCHMARK_TEST_HEIGHT": "64", "BENCHMARK_TEST_STEPS": "2",
               "BENCHMARK_RUNS": "1", **NOT_JUDGED}
        # The simulator offers no checkpoint of its own: the benchmark needs the downloaded one,
        # which it finds only in the folder --models-directory names.
        with start_daemon(tmp_path, "--models-directory", str(models), "--checkpoints",
                          "other.safetensors", "--step-seconds", "0.02", wait_ready=False,
                          extra_env=env) as worker:
            status, body = wait_until(lambda: settled(worker), 90, "the worker to settle")
            assert (status, body["state"]) == (200, "ready"), body
            assert worker.status()["benchmark"]["status"] == "no_reference"  # it ran, found the model
            placed = models / "checkpoints" / "sd15.safetensors"
            assert placed.read_bytes() == model
            assert not (tmp_path / "comfy" / "models" / "checkpoints" / "sd15.safetensors").exists()
            folders = worker.status()["instances"][0]["folders"]
            assert folders["models"] == {"path": str(models),
                                         "why": "from --models-directory in comfyui.command"}


def test_a_plan_with_one_database_for_two_instances_is_refused_at_start(tmp_path):
    command = [sys.executable, "-m", "simulator", "--port", "{port}", "--base-directory",
               str(tmp_path / "comfy")]
    env = base_env(COMFYUI_COMMAND=json.dumps(command), COMFYUI_CWD=str(tmp_path),
                   WORKER_STATE_DIR=str(tmp_path / "state"), WORKER_LOG_DIR=str(tmp_path),
                   WORKER_AUTH_TOKEN="x", GPU_REQUIRED="true",
                   GPU_FAKE_SOURCE=str(fake_gpus(tmp_path / "gpus.json", 2)))
    done = subprocess.run([sys.executable, "-m", "supervisor.commands.cli", "run"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr   # a start that failed, as for comfyui.gpus
    assert "comfy-worker: comfyui.command: instances 0 and 1 would share ComfyUI's SQLite " \
           "database" in done.stderr
    assert "{instance_folders}" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "comfy" / "user").exists(), "no ComfyUI was started"


@pytest.mark.parametrize("assets", ["on", "off"])
def test_missing_asset_packages_name_the_fix_and_assets_off_avoids_them(tmp_path, monkeypatch,
                                                                        assets):
    monkeypatch.setenv("SIM_API_VERSION", NEWEST)
    env = {"COMFYUI_ASSETS": assets, "SUPERVISOR_CRASH_LOOP_COUNT": "2",
           "SUPERVISOR_CRASH_LOOP_WINDOW": "60"}
    with start_daemon(tmp_path, "--simulate-missing-packages", "--step-seconds", "0.01",
                      wait_ready=False, extra_env=env) as worker:
        status, body = wait_until(lambda: settled(worker), 60, "the worker to settle")
        if assets == "off":   # --disable-assets: ComfyUI does not need the packages
            assert (status, body["state"]) == (200, "ready"), body
            return
        assert status == 503
        reason = body["reason"]
        assert "exited with code 1: ASSETS_STARTUP_FAILED: missing_packages (install " \
               "sqlalchemy, alembic and blake3" in reason, reason
        assert 'comfyui.assets = "off"' in reason


def test_a_start_script_with_its_own_help_is_run_on_assumed_flags_and_says_so(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("SIM_API_VERSION", NEWEST)
    script = tmp_path / "start-comfyui.sh"
    script.write_text('#!/bin/sh\ncase "$*" in *--help*) echo "usage: start-comfyui.sh"; exit 0;; '
                      f'esac\nexec {sys.executable} -m simulator "$@" --base-directory '
                      f'{tmp_path}/b\n')
    script.chmod(0o755)
    port = free_port()
    env = {"COMFYUI_COMMAND": json.dumps([str(script), "--port", str(port)])}
    with start_daemon(tmp_path, comfy_port=port, extra_env=env) as worker:
        first = worker.status()["instances"][0]
        assert first["comfyui_flags"]["guessed"]
        # ComfyUI's own feature flags say what the plan could not know: assets run
        assert first["assets"] == {"mode": "on", "why": "ComfyUI's feature flags say on",
                                   "database": None}
        assert "ComfyUI runs its assets database although comfyui.assets is \"off\"" \
            in worker.log()
        assert "--disable-assets" not in comfyui_argv(worker.comfy_url)
        assert "set comfyui.version (COMFYUI_VERSION_OVERRIDE)" in worker.log()
        status, health = get_json(worker.url + "/health")
        note = health["instances"][0]["comfyui_flags"]
        assert "comfyui.version" in note and "start-comfyui.sh" not in note, note
