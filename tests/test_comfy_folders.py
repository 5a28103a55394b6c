"""ComfyUI's folders are asked of its command line, and a file not on disk comes through GET /view.

Regression for issue 11, defect 2: with ComfyUI started as `main.py --base-directory X` and no
`comfyui.output_dir`, every request and the benchmark failed with "not on disk".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from api.comfy import folders as comfy_folders
from api.comfy.folders import discover
from api.comfy.models import OutputFile
from api.wrapper.outputs import collect
from config import load_settings
from simulator.testing import start_simulator
from tests.support import procs
from tests.support.bench import NOT_JUDGED, bench_env, settled
from tests.support.procs import ROOT, base_env, post_json, start_daemon, start_wrapper
from tests.support.workflows import tiny_workflow

TINY = tiny_workflow("f")


def test_folders_follow_comfyuis_command_line(tmp_path):
    cmd = ["python", "main.py", "--listen", "127.0.0.1", "--base-directory", "data"]
    found = discover(cmd, tmp_path / "ComfyUI", Path("/opt/ComfyUI"))
    assert found.output.path == tmp_path / "ComfyUI" / "data" / "output"
    assert found.input.path == tmp_path / "ComfyUI" / "data" / "input"
    assert "--base-directory" in found.output.why
    found = discover([*cmd, "--output-directory=/srv/out", "--temp-directory", "/tmp/x"],
                     None, None)
    assert found.output.path == Path("/srv/out")
    assert found.temp.path == Path("/tmp/x/temp")  # ComfyUI's own layout: a temp/ inside it
    found = discover(cmd, None, None, {"output": Path("/explicit"), "input": None, "temp": None})
    assert found.output.path == Path("/explicit") and found.output.why == "comfyui.output_dir"
    assert discover(["python", "main.py"], None, Path("/opt/C")).output.path == \
        Path("/opt/C/output")
    settings = load_settings(None, environ={
        "COMFYUI_COMMAND": '["python", "main.py", "--base-directory", "/data/comfy"]'})
    assert comfy_folders.from_settings(settings).output.path == Path("/data/comfy/output")


def test_missing_file_error_names_the_path_and_the_setting(tmp_path):
    item = OutputFile(node_id="9", output_type="images", filename="a.png", subfolder="",
                      type="output", local_path=None, mimetype="image/png")
    [entry] = collect([item], tmp_path, "r1", {0: "GET /view answered HTTP 404: nope"},
                      "from --base-directory in comfyui.command")
    assert str(tmp_path / "a.png") in entry["error"]
    assert "comfyui.output_dir" in entry["error"] and "HTTP 404" in entry["error"]


@pytest.mark.e2e
def test_daemon_with_base_directory_and_no_output_setting_benchmarks_and_serves(tmp_path):
    env = bench_env(COMFYUI_OUTPUT_DIR=None, COMFYUI_INSTALL_PATH=str(tmp_path / "not-here"),
                    BENCHMARK_TEST_STEPS="4", **NOT_JUDGED)
    with start_daemon(tmp_path, "--step-seconds", "0.05", wait_ready=False,
                      extra_env=env) as worker:
        status, body = settled(worker)
        assert status == 200 and body["state"] == "ready", (body, worker.log()[-3000:])
        bench = worker.status()["benchmark"]  # it found its image in the guessed output folder
        assert bench["status"] == "no_reference" and bench["seconds"] > 0, bench
        status, result = worker.generate({"input": {"workflow_json": TINY}})
        assert status == 200, result
        [out] = result["output"]
        assert "error" not in out and not out.get("fetched_via_view")
        assert out["local_path"].startswith(str(tmp_path / "comfy" / "output"))
        assert Path(out["local_path"]).read_bytes().startswith(b"\x89PNG")


@pytest.mark.real_processes
def test_wrapper_fetches_a_file_it_cannot_see_through_view(tmp_path):
    with start_simulator(tmp_path, "--step-seconds", "0.01") as comfy:
        elsewhere = tmp_path / "wrapper-side"
        with start_wrapper(tmp_path, comfy.url, elsewhere) as wrapper:
            status, result = post_json(wrapper.url + "/generate/sync",
                                       {"input": {"workflow_json": TINY}})
            assert status == 200, result
            [out] = result["output"]
            assert out.get("fetched_via_view") is True and "error" not in out
            path = Path(out["local_path"])
            assert path.parent == elsewhere / result["id"]
            assert path.read_bytes() == (comfy.output_dir / "f_00001_.png").read_bytes()
            assert not list(path.parent.glob(".*partial"))


@pytest.mark.real_processes
def test_benchmark_against_a_remote_comfyui_needs_no_output_dir(tmp_path):
    with start_simulator(tmp_path, "--step-seconds", "0.01") as comfy:
        env = base_env(COMFYUI_INSTALL_PATH=str(tmp_path / "no-such-folder"),
                       BENCHMARK_TEST_WIDTH="64", BENCHMARK_TEST_HEIGHT="64",
                       BENCHMARK_TEST_STEPS="3", BENCHMARK_RUNS="1",
                       WORKER_STATE_DIR=str(tmp_path / "state"))
        done = procs.run([sys.executable, "-m", "supervisor.commands.cli", "benchmark",
                          "--comfyui-url", comfy.url, "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert '"status": "no_reference"' in done.stdout or '"status": "pass"' in done.stdout
    assert not os.path.exists(tmp_path / "no-such-folder")


def test_models_folder_follows_the_base_directory_and_the_setting_wins():
    from api.comfy.folders import discover

    found = discover(["python", "main.py", "--base-directory", "/srv/comfy"], None, Path("/opt/C"))
    assert found.models.path == Path("/srv/comfy/models")
    assert "--base-directory" in found.models.why
    found = discover(["python", "main.py"], None, Path("/opt/C"), {"models": Path("/m")})
    assert found.models.path == Path("/m") and found.models.why == "comfyui.models_dir"


def test_a_guess_is_replaced_by_the_running_command_and_settings_still_win(tmp_path):
    from api.comfy.folders import from_running, guessed

    install = tmp_path / "ComfyUI"
    configured = discover([str(tmp_path / "start-comfyui.sh"), "base", "8188"], None, install)
    assert guessed(configured) and configured.output.path == install / "output"

    real = ["/venv/bin/python", "main.py", "--cpu", "--base-directory", "../data", "--port", "8188"]
    found = from_running(real, tmp_path / "run", install, {}, "ComfyUI's running command (pid 7)")
    assert found.output.path == tmp_path / "data" / "output"  # relative to ComfyUI's own cwd
    assert found.output.why == "from --base-directory in ComfyUI's running command (pid 7), then output/"
    assert found.models.path == tmp_path / "data" / "models" and not guessed(found)

    pinned = from_running(real, tmp_path / "run", install, {"output": tmp_path / "mine"}, "x")
    assert pinned.output.path == tmp_path / "mine" and pinned.output.why == "comfyui.output_dir"
    assert pinned.input.path == tmp_path / "data" / "input"
    assert from_running(["python", "main.py", "--cpu"], tmp_path, install, {}, "x") is None
    assert not guessed(discover(["main.py", "--output-directory", "/o"], None, install))
