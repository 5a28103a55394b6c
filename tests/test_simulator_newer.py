"""The simulator's two ComfyUI APIs: 0.3.64 (the default) and the newest read (0.38.1).

Every difference between the modes is driven here through real simulator processes over real
HTTP and WebSocket; tests/test_simulator.py covers what both modes share.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from simulator.api_version import ApiVersion
from simulator.cli import build_parser
from simulator.testing import SimulatorHandle, launch_simulator, start_simulator, stop_process, wait_ready
from tests.support import procs

pytestmark = pytest.mark.timeout(60)

OLD, NEW = ApiVersion.V0_3_64, ApiVersion.V0_38_1
REPO = Path(__file__).resolve().parent.parent


def empty_to_save(prefix: str = "new", width: int = 16) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": width, "height": 8, "batch_size": 1, "color": 255}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def slow_prompt(steps: int, seed: int = 1, prefix: str = "slow") -> dict[str, Any]:
    """A sampler of ``steps`` steps (step_seconds each), so a test can catch it running."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a barn", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


@pytest.fixture
def new_sim(tmp_path):
    with start_simulator(tmp_path, "--step-seconds", "0.01", "--assets-gc-seconds", "0.2", api_version=NEW) as sim:
        yield sim


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def submit(http: aiohttp.ClientSession, sim: SimulatorHandle, prompt: dict[str, Any], **body: Any) -> str:
    async with http.post(f"{sim.url}/prompt", json={"prompt": prompt, **body}) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["prompt_id"]


async def until(check, timeout: float = 10.0, what: str = "the condition"):
    """Poll ``check`` (async, returns a truthy value when done) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def finished(http: aiohttp.ClientSession, sim: SimulatorHandle, prompt_id: str) -> dict[str, Any]:
    async def done():
        entry = await get_json(http, f"{sim.url}/history/{prompt_id}")
        return entry.get(prompt_id)
    return await until(done, what=f"prompt {prompt_id} to finish")


async def running_id(http: aiohttp.ClientSession, sim: SimulatorHandle) -> str | None:
    queue = await get_json(http, f"{sim.url}/queue")
    return queue["queue_running"][0][1] if queue["queue_running"] else None


def exit_of(handle: SimulatorHandle, timeout: float = 20) -> int:
    return handle.process.wait(timeout=timeout)


def error_lines(handle: SimulatorHandle) -> list[str]:
    return [line for line in handle.log_text().splitlines() if line.strip()]


# --- version, /system_stats, flags -------------------------------------------------------------

@pytest.mark.real_processes
@pytest.mark.parametrize("version", [OLD, NEW])
async def test_system_stats_names_the_version_and_its_fields(tmp_path, http, version):
    with start_simulator(tmp_path, api_version=version) as sim:
        stats = await get_json(http, f"{sim.url}/system_stats")
    system = stats["system"]
    assert system["simulator"] is True and system["comfyui_version"] == f"{version.value}-sim"
    assert sim.api_version is version
    assert [d["type"] for d in stats["devices"]] == ["cpu"]
    if version is NEW:
        assert system["os"] == sys.platform and system["deploy_environment"] == "local-git"
        assert {p["name"] for p in system["comfy_package_versions"]} >= {"comfyui-frontend-package"}
    else:
        assert system["os"] == os.name
        assert "deploy_environment" not in system and "comfy_package_versions" not in system


@pytest.mark.real_processes
def test_sim_api_version_in_the_environment_switches_the_default(tmp_path):
    env = {**os.environ, "SIM_API_VERSION": "0.38.1"}
    with start_simulator(tmp_path, env=env) as sim:
        assert sim.api_version is NEW
        assert "ComfyUI version: 0.38.1-sim" in sim.log_text()


@pytest.mark.real_processes
def test_a_flag_0_3_64_does_not_know_exits_2_like_comfyui(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    handle = launch_simulator(tmp_path, "--models-directory", str(models), api_version=OLD)
    assert exit_of(handle) == 2
    assert f"unrecognized arguments: --models-directory {models}" in handle.log_text()


@pytest.mark.parametrize("args, old_ok, new_ok", [
    (["--normalvram"], True, False),           # gone from the newest VRAM group
    (["--disable-ipex-optimize"], True, False),
    (["--cache-ram"], False, True),
    (["--cache-ram", "4", "8"], False, True),
    (["--cuda-device", "all"], False, True),   # an int in 0.3.64, a string now
    (["--cuda-device", "0,1"], False, True),
    (["--cuda-device", "1"], True, True),
    (["--offline"], False, True),
    (["--disable-assets"], False, True),
    (["--feature-flag", "show_signin_button=true"], False, True),
    (["--verbose", "DEBUG", "log.txt"], False, True),  # LEVEL FILE
    (["--verbose", "DETAIL"], False, True),
    (["--verbose", "WARNING"], True, True),
    (["--preview-method", "auto", "--fast"], True, True),
    (["--cpu", "--highvram"], False, False),   # one exclusive group in both
    (["--no-such-flag"], False, False),
])
def test_each_version_accepts_exactly_its_own_flags(args, old_ok, new_ok):
    for version, ok in ((OLD, old_ok), (NEW, new_ok)):
        parser = build_parser(version, every_comfyui_flag=True)
        if ok:
            parser.parse_args(args)
        else:
            with pytest.raises(SystemExit) as exited:
                parser.parse_args(args)
            assert exited.value.code == 2, (version, args)


def test_flags_the_worker_passes_are_real_comfyui_flags_in_both_versions(tmp_path):
    """The command lines this project's callers build: the instance folders, the demo's and the
    benchmarks' simulator lines, the test fixtures' ComfyUI flags."""
    root = tmp_path / "instances" / "0"
    (root / "user").mkdir(parents=True)
    callers = [
        ["--listen", "127.0.0.1", "--port", "18188", "--base-directory", str(tmp_path)],
        ["--output-directory", str(root / "output"), "--input-directory", str(root / "input"),
         "--temp-directory", str(root), "--user-directory", str(root / "user"),
         "--database-url", f"sqlite:///{root / 'user' / 'comfyui.db'}"],
        ["--cpu", "--disable-auto-launch", "--preview-method", "auto"],
    ]
    knobs = ["--step-seconds", "0.05", "--slow-factor", "2", "--device-type", "cuda", "--device-name", "GPU",
             "--checkpoints", "a.safetensors", "--fail-node", "KSampler", "--crash-during-prompt", "7",
             "--hang-during-prompt", "--load-seconds", "0", "--startup-delay", "0", "--strict-base-directory"]
    for version in (OLD, NEW):
        for line in [*callers, knobs]:
            build_parser(version, every_comfyui_flag=True).parse_args(line)


def test_the_lock_waits_five_seconds_unless_told_otherwise():
    assert build_parser(NEW).parse_args([]).db_lock_wait_seconds == 5.0


@pytest.mark.real_processes
def test_list_feature_flags_prints_json_and_exits_before_anything_else(tmp_path):
    result = procs.run([sys.executable, "-m", "simulator", "--api-version", "0.38.1", "--list-feature-flags",
                        "--base-directory", str(tmp_path / "base")],
                       cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    flags = json.loads(result.stdout)
    assert set(flags) == {"show_signin_button", "enable_telemetry", "partner_run_gate_enabled"}
    assert {name: (f["type"], f["default"]) for name, f in flags.items()} == {
        "show_signin_button": ("bool", False), "enable_telemetry": ("bool", False),
        "partner_run_gate_enabled": ("bool", True)}
    assert not (tmp_path / "base").exists()  # no folders made, nothing started
    old = procs.run([sys.executable, "-m", "simulator", "--api-version", "0.3.64", "--list-feature-flags"],
                    cwd=REPO, capture_output=True, text=True, timeout=30)
    assert old.returncode == 2 and "unrecognized arguments: --list-feature-flags" in old.stderr


# --- models directory, cuda device, verbose ------------------------------------------------------

@pytest.mark.real_processes
async def test_models_directory_is_where_checkpoints_are_found(tmp_path, http):
    models = tmp_path / "models-elsewhere"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "mine.safetensors").write_bytes(b"x")
    base_models = tmp_path / "comfyui" / "models" / "checkpoints"
    base_models.mkdir(parents=True)
    (base_models / "not-here.safetensors").write_bytes(b"x")
    log_file = tmp_path / "comfy.log"
    with start_simulator(tmp_path, "--models-directory", str(models), "--checkpoints", "",
                         "--cuda-device", "0,1", "--verbose", "INFO", str(log_file), api_version=NEW) as sim:
        info = await get_json(http, f"{sim.url}/object_info/CheckpointLoaderSimple")
        assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["mine.safetensors"]
        prompt = slow_prompt(1)
        prompt["4"]["inputs"]["ckpt_name"] = "mine.safetensors"
        prompt_id = await submit(http, sim, prompt)
        assert (await finished(http, sim, prompt_id))["status"]["status_str"] == "success"
        log = sim.log_text()
    assert f"Setting models directory to: {models}" in log
    assert "Set cuda device to: 0,1" in log
    assert "To see the GUI go to:" in log_file.read_text()  # --verbose LEVEL FILE adds a log file


@pytest.mark.real_processes
def test_models_directory_must_exist(tmp_path):
    handle = launch_simulator(tmp_path, "--models-directory", str(tmp_path / "nope"), api_version=NEW)
    assert exit_of(handle) == 2
    assert f"argument --models-directory: The path '{tmp_path / 'nope'}' does not exist." in handle.log_text()


# --- the database lock ------------------------------------------------------------------------

@pytest.mark.real_processes
def test_a_second_simulator_on_one_database_waits_then_exits_in_use(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    with start_simulator(tmp_path / "a", "--user-directory", str(user), api_version=NEW) as first:
        assert (user / "comfyui.db").is_file() and (user / "comfyui.db.lock").exists()
        started = time.monotonic()
        second = launch_simulator(tmp_path / "b", "--user-directory", str(user), "--db-lock-wait-seconds", "0.6",
                                  api_version=NEW)
        assert exit_of(second) == 1
        waited = time.monotonic() - started
        lines = error_lines(second)
        log = "\n".join(lines)
        assert "Database lock is held; waiting up to 0.6s for it to be released" in log
        marker = lines.index("ASSETS_STARTUP_FAILED: in_use")
        assert f"Another ComfyUI is already using this database: '{user / 'comfyui.db'}'." in lines[marker + 1]
        assert "--database-url" in log and lines[-1].endswith("--disable-assets")  # advice comes last
        assert waited >= 0.6
        assert "To see the GUI go to" not in log  # it never bound its port
        first.process.kill()  # the kernel drops a dead holder's lock
        first.process.wait(10)
        with start_simulator(tmp_path / "c", "--user-directory", str(user), api_version=NEW) as third:
            assert third.process.poll() is None


@pytest.mark.real_processes
async def test_with_assets_off_no_lock_is_taken_and_a_holder_only_warns(tmp_path, http):
    user = tmp_path / "user"
    user.mkdir()
    with start_simulator(tmp_path / "a", "--user-directory", str(user), api_version=NEW) as holder, \
            start_simulator(tmp_path / "b", "--user-directory", str(user), "--disable-assets",
                            api_version=NEW) as second:
        assert holder.process.poll() is None
        assert "Another ComfyUI is already using this install's asset database" in second.log_text()
        features = await get_json(http, f"{second.url}/features")
        assert features["assets"] is False
        prompt_id = await submit(http, second, empty_to_save())
        outputs = (await finished(http, second, prompt_id))["outputs"]["2"]["images"][0]
        assert "id" not in outputs
        assert (await get_json(http, f"{second.url}/__sim__/assets"))["enabled"] is False


@pytest.mark.real_processes
def test_in_memory_database_needs_no_lock(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    with start_simulator(tmp_path / "a", "--user-directory", str(user), api_version=NEW), \
            start_simulator(tmp_path / "b", "--user-directory", str(user), "--database-url", "sqlite:///:memory:",
                            api_version=NEW) as second:
        assert second.process.poll() is None


@pytest.mark.real_processes
def test_a_database_url_that_is_not_sqlite_stops_start_up(tmp_path):
    handle = launch_simulator(tmp_path, "--database-url", "postgresql://db/comfy", api_version=NEW)
    assert exit_of(handle) == 1
    assert "ASSETS_STARTUP_FAILED: unsupported_url" in handle.log_text()


@pytest.mark.real_processes
@pytest.mark.parametrize("version, extra, code", [(NEW, (), 1), (NEW, ("--disable-assets",), None), (OLD, (), None)])
def test_missing_database_packages(tmp_path, version, extra, code):
    handle = launch_simulator(tmp_path, "--simulate-missing-packages", *extra, api_version=version)
    try:
        if code is None:  # starts anyway
            wait_ready(handle, 20)
            if version is OLD:
                assert "Error importing dependencies" in handle.log_text()
            return
        assert exit_of(handle) == code
        lines = error_lines(handle)
        marker = lines.index("ASSETS_STARTUP_FAILED: missing_packages")
        advice = lines[marker + 1:]
        assert len(advice) >= 3 and "sqlalchemy, alembic, blake3" in advice[0]
        assert lines[-1].endswith("--disable-assets")
    finally:
        stop_process(handle.process)


@pytest.mark.real_processes
@pytest.mark.parametrize("version", [OLD, NEW])
def test_a_busy_port(tmp_path, version):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        handle = launch_simulator(tmp_path, port=port, api_version=version)
        assert exit_of(handle) == 1
    log = handle.log_text()
    if version is NEW:
        assert f"Port {port} is already in use on address 127.0.0.1. Please close the other application" in log
        assert "Traceback" not in log
        assert not handle.temp_dir.exists()  # its shutdown ran
    else:
        assert "address already in use" in log.lower() and "Traceback" in log


# --- POST /prompt -------------------------------------------------------------------------------

# Fixed values: parallel workers (pytest-xdist) must collect the same test ids.
@pytest.mark.parametrize("bad", ["ABCDEF00-0000-4000-8000-000000000000", "3f2b8c1e9a7d4e5f8b6c0d1e2f3a4b5c",
                                 "{3f2b8c1e-9a7d-4e5f-8b6c-0d1e2f3a4b5c}", 5, "job-1"])
@pytest.mark.real_processes
async def test_a_prompt_id_must_be_a_canonical_uuid_in_the_newest(new_sim, http, bad):
    async with http.post(f"{new_sim.url}/prompt", json={"prompt": empty_to_save(), "prompt_id": bad}) as response:
        assert response.status == 400
        body = await response.json()
    assert body["node_errors"] == {}
    assert (body["error"]["type"], body["error"]["message"]) == ("invalid_prompt_id", "prompt_id must be a valid UUID")
    assert (await get_json(http, f"{new_sim.url}/queue"))["queue_pending"] == []


@pytest.mark.real_processes
async def test_prompt_ids_null_and_canonical_in_both_versions(tmp_path, http):
    chosen = str(uuid.uuid4())
    with start_simulator(tmp_path / "new", api_version=NEW) as new, \
            start_simulator(tmp_path / "old", api_version=OLD) as old:
        assert await submit(http, new, empty_to_save(), prompt_id=chosen) == chosen
        made = await submit(http, new, empty_to_save(), prompt_id=None)
        assert str(uuid.UUID(made)) == made
        # 0.3.64 turns any value into a string, even null.
        assert await submit(http, old, empty_to_save(), prompt_id="job-1") == "job-1"
        assert await submit(http, old, empty_to_save(), prompt_id=None) == "None"
        assert await submit(http, old, empty_to_save(), prompt_id=7) == "7"


@pytest.mark.real_processes
async def test_unknown_node_type_and_create_time(tmp_path, http):
    unknown = {"1": {"class_type": "NoSuchNode", "inputs": {}, "_meta": {"title": "My node"}}}
    with start_simulator(tmp_path / "new", "--step-seconds", "0.2", api_version=NEW) as new, \
            start_simulator(tmp_path / "old", "--step-seconds", "0.2", api_version=OLD) as old:
        async with http.post(f"{new.url}/prompt", json={"prompt": unknown}) as response:
            assert response.status == 400
            error = (await response.json())["error"]
        assert error == {"type": "missing_node_type",
                         "message": "Node 'My node' not found. The custom node may not be installed.",
                         "details": "Node ID '#1'",
                         "extra_info": {"node_id": "1", "class_type": "NoSuchNode", "node_title": "My node"}}
        async with http.post(f"{old.url}/prompt", json={"prompt": unknown}) as response:
            assert response.status == 400
            assert (await response.json())["error"]["type"] == "invalid_prompt"

        before = int(time.time() * 1000)
        await submit(http, new, slow_prompt(20), client_id="c")
        await submit(http, old, slow_prompt(20), client_id="c")
        after = int(time.time() * 1000)
        new_extra, old_extra = [await _first_queued_extra(http, sim) for sim in (new, old)]
        assert new_extra["client_id"] == "c" and before <= new_extra["create_time"] <= after
        assert old_extra == {"client_id": "c"}


async def _first_queued_extra(http, sim) -> dict[str, Any]:
    queue = await get_json(http, f"{sim.url}/queue")
    return (queue["queue_running"] + queue["queue_pending"])[0][3]


@pytest.mark.real_processes
@pytest.mark.parametrize("version", [OLD, NEW])
async def test_post_prompt_can_answer_late_or_not_at_all_after_queueing(tmp_path, http, version):
    with start_simulator(tmp_path, "--step-seconds", "0.01", api_version=version) as sim:
        await http.post(f"{sim.url}/__sim__/knobs", json={"post_prompt_delay": 2})
        chosen = str(uuid.uuid4())
        with pytest.raises(asyncio.TimeoutError):
            await http.post(f"{sim.url}/prompt", json={"prompt": empty_to_save("late"), "prompt_id": chosen},
                            timeout=aiohttp.ClientTimeout(total=0.3))
        assert (await finished(http, sim, chosen))["status"]["status_str"] == "success"

        await http.post(f"{sim.url}/__sim__/knobs", json={"post_prompt_delay": 0, "post_prompt_drop": True})
        dropped = str(uuid.uuid4())
        with pytest.raises(aiohttp.ClientError):
            await http.post(f"{sim.url}/prompt", json={"prompt": empty_to_save("dropped"), "prompt_id": dropped})
        assert (await finished(http, sim, dropped))["status"]["status_str"] == "success"
        assert (await get_json(http, f"{sim.url}/__sim__/knobs"))["post_prompt_drop"] is True


# --- jobs API -----------------------------------------------------------------------------------

@pytest.mark.real_processes
async def test_jobs_api_lists_and_shows_jobs(tmp_path, http):
    with start_simulator(tmp_path, "--step-seconds", "0.05", api_version=NEW) as sim:
        done = await submit(http, sim, empty_to_save("done"))
        await finished(http, sim, done)
        running = await submit(http, sim, slow_prompt(100, seed=2), client_id="c")
        await asyncio.sleep(0.005)  # a later create_time (milliseconds) for the next one
        pending = await submit(http, sim, slow_prompt(100, seed=3), client_id="c")
        await until(lambda: _is_running(http, sim, running), what="the slow prompt to start")

        listing = await get_json(http, f"{sim.url}/api/jobs")
        assert [(j["id"], j["status"]) for j in listing["jobs"]] == [
            (pending, "pending"), (running, "in_progress"), (done, "completed")]  # newest first
        assert listing["pagination"] == {"offset": 0, "limit": None, "total": 3, "has_more": False}
        page = await get_json(http, f"{sim.url}/api/jobs?sort_order=asc&limit=1&offset=1")
        assert [j["id"] for j in page["jobs"]] == [running]
        assert page["pagination"] == {"offset": 1, "limit": 1, "total": 3, "has_more": True}
        only = await get_json(http, f"{sim.url}/api/jobs?status=pending,completed")
        assert {j["id"] for j in only["jobs"]} == {pending, done}
        for query, message in (("status=queued", "Invalid status value(s): queued"), ("limit=0", "limit"),
                               ("limit=x", "limit"), ("sort_by=name", "sort_by"), ("sort_order=up", "sort_order"),
                               ("offset=x", "offset")):
            async with http.get(f"{sim.url}/api/jobs?{query}") as response:
                assert response.status == 400, query
                assert message in (await response.json())["error"]

        finished_job = await get_json(http, f"{sim.url}/api/jobs/{done}")
        assert finished_job["status"] == "completed" and finished_job["outputs_count"] == 1
        assert finished_job["preview_output"]["filename"] == "done_00001_.png"
        assert finished_job["execution_start_time"] <= finished_job["execution_end_time"]
        assert finished_job["execution_status"]["status_str"] == "success"
        assert finished_job["outputs"]["2"]["images"][0]["id"]  # assets are on
        running_job = await get_json(http, f"{sim.url}/api/jobs/{running}")
        assert running_job["status"] == "in_progress" and running_job["outputs_count"] == 0
        assert running_job["workflow"]["prompt"]["3"]["class_type"] == "KSampler"
        assert (await get_json(http, f"{sim.url}/api/jobs/{pending}"))["status"] == "pending"
        async with http.get(f"{sim.url}/api/jobs/{uuid.uuid4()}") as response:
            assert (response.status, await response.json()) == (404, {"error": "Job not found"})
        async with http.get(f"{sim.url}/jobs") as response:
            assert response.status == 404  # registered under /api only
        assert (await get_json(http, f"{sim.url}/api/api/jobs"))["pagination"]["total"] == 3


async def _is_running(http, sim, prompt_id: str) -> bool:
    return await running_id(http, sim) == prompt_id


@pytest.mark.real_processes
async def test_jobs_api_is_not_in_0_3_64(tmp_path, http):
    with start_simulator(tmp_path, api_version=OLD) as sim:
        async with http.get(f"{sim.url}/api/jobs") as response:
            assert response.status == 404


@pytest.mark.real_processes
async def test_cancel_pending_and_running_jobs_leaves_the_next_alone(tmp_path, http):
    with start_simulator(tmp_path, "--step-seconds", "0.05", api_version=NEW) as sim:
        first = await submit(http, sim, slow_prompt(200, seed=1), client_id="c")
        second = await submit(http, sim, slow_prompt(200, seed=2), client_id="c")
        third = await submit(http, sim, slow_prompt(3, seed=3), client_id="c")
        await until(lambda: _is_running(http, sim, first), what="the first prompt to start")

        async def cancel(job_id: str) -> bool:
            async with http.post(f"{sim.url}/api/jobs/{job_id}/cancel") as response:
                assert response.status == 200
                return (await response.json())["cancelled"]

        assert await cancel(second) is True
        pending = (await get_json(http, f"{sim.url}/queue"))["queue_pending"]
        assert [item[1] for item in pending] == [third]
        assert await cancel(first) is True
        interrupted = await finished(http, sim, first)
        assert interrupted["status"]["status_str"] == "error"
        assert "execution_interrupted" in [event for event, _ in interrupted["status"]["messages"]]
        assert (await get_json(http, f"{sim.url}/api/jobs/{first}"))["status"] == "cancelled"
        # The interrupt went to the first prompt only: the next one runs to the end.
        entry = await finished(http, sim, third)
        assert entry["status"]["status_str"] == "success"
        assert (await get_json(http, f"{sim.url}/api/jobs/{third}"))["status"] == "completed"
        assert await cancel(first) is False  # finished: a no-op
        assert await cancel(str(uuid.uuid4())) is False
        async with http.get(f"{sim.url}/api/jobs/{second}") as response:
            assert response.status == 404  # dropped from the queue, never ran


@pytest.mark.real_processes
async def test_cancelling_a_finished_job_never_hits_the_one_running_now(tmp_path, http):
    with start_simulator(tmp_path, "--step-seconds", "0.02", api_version=NEW) as sim:
        quick = await submit(http, sim, empty_to_save("quick"))
        slow = await submit(http, sim, slow_prompt(40, seed=9))
        await until(lambda: _is_running(http, sim, slow), what="the slow prompt to start")
        async with http.post(f"{sim.url}/api/jobs/cancel", json={"job_ids": [quick]}) as response:
            assert (response.status, await response.json()) == (200, {"cancelled": False})
        assert (await finished(http, sim, slow))["status"]["status_str"] == "success"


@pytest.mark.real_processes
async def test_batch_cancel_checks_its_body(new_sim, http):
    for body, status, key in ((b"not json", 400, "error"), ({"job_ids": "x"}, 400, "error"),
                              ({"job_ids": [str(uuid.uuid4()), "nope", 3]}, 400, "invalid_ids"),
                              ({"job_ids": [str(uuid.uuid4())]}, 200, "cancelled")):
        kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with http.post(f"{new_sim.url}/api/jobs/cancel", **kwargs) as response:
            assert response.status == status, body
            answer = await response.json()
            assert key in answer
            if key == "invalid_ids":
                assert answer["invalid_ids"] == ["nope", "3"]


# --- assets ---------------------------------------------------------------------------------

@pytest.mark.real_processes
async def test_outputs_and_uploads_are_recorded_and_deleted_files_stay_as_missing_rows(tmp_path, http):
    with start_simulator(tmp_path, "--step-seconds", "0.01", "--assets-gc-seconds", "0.2", api_version=NEW) as sim:
        assert (await get_json(http, f"{sim.url}/__sim__/assets"))["rows"] == 0
        client = "assets"
        async with http.ws_connect(f"{sim.ws_url}?clientId={client}") as ws:
            await ws.receive_json(timeout=5)
            first = await submit(http, sim, empty_to_save("a"), client_id=client)
            executed = None
            while executed is None:
                event = await ws.receive_json(timeout=10)
                if event["type"] == "executed" and event["data"]["prompt_id"] == first:
                    executed = event["data"]["output"]["images"][0]
        entry = (await finished(http, sim, first))["outputs"]["2"]["images"][0]
        assert executed["id"] == entry["id"] == entry["preview_id"]
        # A file no node declared is found by the walk after the next prompt.
        (sim.output_dir / "dropped-in.png").write_bytes(b"not really a png")
        await finished(http, sim, await submit(http, sim, empty_to_save("b"), client_id=client))

        async def walked_three():
            counts = await get_json(http, f"{sim.url}/__sim__/assets")
            return counts if counts["last_walk_files"] == 3 and counts["rows"] == 3 else None
        counts = await until(walked_three, what="a walk that finds three files")
        assert counts["missing"] == 0 and counts["walks"] >= 1

        form = aiohttp.FormData()
        form.add_field("image", b"\x89PNG fake", filename="up.png", content_type="image/png")
        async with http.post(f"{sim.url}/upload/image", data=form) as response:
            upload = await response.json()
        assert upload["asset"]["name"] == "up.png" and upload["asset"]["asset_hash"].startswith("blake3:")
        assert upload["asset"]["tags"] == ["input"] and upload["asset"]["size"] == 9
        async with http.get(f"{sim.url}/view", params={"filename": upload["asset"]["asset_hash"]}) as response:
            assert response.status == 200 and await response.read() == b"\x89PNG fake"
            assert response.headers["X-Content-Type-Options"] == "nosniff"

        # Deleting an output does not delete its row: the walk marks it missing, as ComfyUI does.
        (sim.output_dir / "a_00001_.png").unlink()
        await finished(http, sim, await submit(http, sim, empty_to_save("c"), client_id=client))

        async def marked_missing():
            counts = await get_json(http, f"{sim.url}/__sim__/assets")
            return counts if counts["missing"] == 1 and counts["rows"] == 5 else None
        counts = await until(marked_missing, what="the deleted output to be marked missing")
        db = sim.base_dir / "user" / "comfyui.db"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            assert conn.execute("SELECT COUNT(*) FROM assets").fetchone()[0] == counts["rows"]


@pytest.mark.real_processes
async def test_assets_are_off_in_0_3_64(tmp_path, http):
    with start_simulator(tmp_path, api_version=OLD) as sim:
        prompt_id = await submit(http, sim, empty_to_save())
        assert "id" not in (await finished(http, sim, prompt_id))["outputs"]["2"]["images"][0]
        assert await get_json(http, f"{sim.url}/__sim__/assets") == {
            "enabled": False, "rows": 0, "missing": 0, "walks": 0, "last_walk_files": 0}
        assert not (sim.base_dir / "user" / "comfyui.db").exists()


@pytest.mark.real_processes
async def test_date_based_output_saves_into_a_dated_subfolder(tmp_path, http):
    with start_simulator(tmp_path, "--date-based-output", "--date-output-format", "%Y", api_version=NEW) as sim:
        prompt_id = await submit(http, sim, empty_to_save("dated"))
        image = (await finished(http, sim, prompt_id))["outputs"]["2"]["images"][0]
    year = time.strftime("%Y")
    assert image["subfolder"] == year
    assert (sim.output_dir / year / image["filename"]).is_file()


# --- WebSocket, features, cross-site ----------------------------------------------------------

@pytest.mark.real_processes
@pytest.mark.parametrize("version", [OLD, NEW])
async def test_feature_flags_handshake_and_features(tmp_path, http, version):
    extra = ("--feature-flag", "show_signin_button=true", "--feature-flag", "assets=false",
             "--feature-flag", "my_flag") if version is NEW else ()
    with start_simulator(tmp_path, *extra, api_version=version) as sim:
        async with http.ws_connect(f"{sim.ws_url}?clientId=f") as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "status"
            await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
            answer = await ws.receive_json(timeout=5)
        assert answer["type"] == "feature_flags"
        assert await get_json(http, f"{sim.url}/features") == answer["data"]
    flags = answer["data"]
    if version is NEW:
        assert flags["assets"] is True  # an extra never replaces a core flag
        assert flags["node_replacements"] is True and flags["supports_model_type_tags"] is True
        assert flags["extension"] == {"manager": {"supports_v4": True}}
        assert (flags["show_signin_button"], flags["my_flag"]) == (True, "true")
    else:
        assert flags == {"supports_preview_metadata": True, "max_upload_size": 100 * 1024 * 1024}


@pytest.mark.real_processes
async def test_progress_state_reports_every_node_that_started(new_sim, http):
    async with http.ws_connect(f"{new_sim.ws_url}?clientId=p") as ws:
        await ws.receive_json(timeout=5)
        prompt_id = await submit(http, new_sim, slow_prompt(2), client_id="p")
        events: list[dict[str, Any]] = []
        while not (events and events[-1]["type"] == "executing" and events[-1]["data"]["node"] is None):
            events.append(await ws.receive_json(timeout=10))
    states = [e["data"] for e in events if e["type"] == "progress_state"]
    steps = [e["data"] for e in events if e["type"] == "progress"]
    assert [s["value"] for s in steps] == [1, 2] and all(s["prompt_id"] == prompt_id for s in steps)
    last = states[-1]["nodes"]
    assert set(last) == {"3", "4", "5", "6", "8", "9"}
    assert last["3"] == {"value": 2, "max": 2, "state": "finished", "node_id": "3", "prompt_id": prompt_id,
                         "display_node_id": "3", "parent_node_id": None, "real_node_id": "3"}


@pytest.mark.real_processes
@pytest.mark.parametrize("version, status", [(OLD, 200), (NEW, 403)])
async def test_cross_site_requests(tmp_path, http, version, status):
    with start_simulator(tmp_path, api_version=version) as sim:
        for method, path in (("GET", "/system_stats"), ("POST", "/prompt")):
            async with http.request(method, f"{sim.url}{path}", json={"prompt": empty_to_save()},
                                    headers={"Sec-Fetch-Site": "cross-site"}) as response:
                assert response.status == status, (method, path)
        async with http.get(f"{sim.url}/system_stats", headers={"Sec-Fetch-Site": "same-origin"}) as response:
            assert response.status == 200


# --- shutdown -------------------------------------------------------------------------------

@pytest.mark.parametrize("version, sig, temp_left", [
    (NEW, signal.SIGINT, False), (OLD, signal.SIGINT, True), (NEW, signal.SIGTERM, True)])
@pytest.mark.real_processes
async def test_temp_folder_at_shutdown(tmp_path, http, version, sig, temp_left):
    handle = launch_simulator(tmp_path, api_version=version)
    wait_ready(handle, 20)
    preview = {"1": empty_to_save()["1"], "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    entry = await finished(http, handle, await submit(http, handle, preview))
    assert (handle.temp_dir / entry["outputs"]["2"]["images"][0]["filename"]).is_file()
    handle.process.send_signal(sig)
    code = await asyncio.to_thread(handle.process.wait, 15)
    # Neither version handles SIGTERM: it ends the process at once, with no cleanup.
    assert code == (0 if sig == signal.SIGINT else -signal.SIGTERM)
    if sig == signal.SIGINT:
        assert "Stopped server" in handle.log_text()
    assert handle.temp_dir.exists() is temp_left


async def test_interrupt_if_running_checks_and_signals_in_one_step():
    """The cancel endpoint's guarantee: only the prompt running now is ever interrupted."""
    from simulator.prompt_queue import ExecutionStatus, PromptQueue, QueueItem

    queue = PromptQueue(lambda: None)
    signals: list[str] = []
    queue.put(QueueItem(0, "a", {}, {}, []))
    queue.put(QueueItem(1, "b", {}, {}, []))
    _, task_a = await queue.get()
    assert queue.interrupt_if_running("b", lambda: signals.append("b")) is False  # only queued
    assert queue.interrupt_if_running("a", lambda: signals.append("a")) is True
    queue.task_done(task_a, {}, ExecutionStatus("success", True, []))
    await queue.get()  # b runs now
    assert queue.interrupt_if_running("a", lambda: signals.append("late a")) is False  # a has finished
    assert signals == ["a"]
