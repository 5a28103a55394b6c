"""Knowing the ComfyUI that runs: its flags asked before launch (real processes: the simulator in
both API modes, a script that swallows --help, and a real ComfyUI when the environment names
one), the folders and database its command line gives, and the start-up failures it can die of.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest

from api.comfy.failures import startup_failures
from api.comfy.flags import (
    FLAGS_0_3_64,
    FLAGS_NEWEST,
    ComfyFlags,
    for_version,
    parse_help,
    version_file,
)
from api.comfy.folders import discover
from config import load_settings
from supervisor.children.childlog import exit_cause
from supervisor.instances.probe import learn_flags
from tests.support.procs import ROOT
from tests.support.timing import allowance

SIM = [sys.executable, "-m", "simulator", "--listen", "127.0.0.1", "--port", "{port}"]


def probe(command: list[str], cwd: Path = ROOT, timeout: float = 15.0, **env: str) -> ComfyFlags:
    settings = load_settings(None, environ={"COMFYUI_COMMAND": json.dumps(command),
                                            "COMFYUI_CWD": str(cwd),
                                            "COMFYUI_INSTALL_PATH": str(cwd), **env})
    return asyncio.run(learn_flags(settings, timeout=timeout))


# --- asked before launch --------------------------------------------------------------------------
@pytest.mark.real_processes
@pytest.mark.parametrize("api_version", ["0.3.64", "0.38.1"])
def test_the_flags_are_asked_of_the_comfyui_that_will_run(api_version):
    flags = probe([*SIM, "--api-version", api_version, "{instance_folders}"])
    assert flags.exact and not flags.warning
    assert flags.source.startswith("asked: `") and "--help` (" in flags.source
    assert flags.knows("--user-directory") and flags.knows("--database-url")
    newest = api_version == "0.38.1"
    assert flags.knows("--disable-assets") is newest
    assert flags.knows("--models-directory") is newest
    assert flags.knows("--normalvram") is not newest   # the newest dropped it
    # every flag this project records for that version is in what it answered
    assert (FLAGS_NEWEST if newest else FLAGS_0_3_64) <= flags.known


@pytest.mark.real_processes
def test_a_script_that_swallows_help_is_stopped_and_a_version_stands_in(tmp_path):
    script = tmp_path / "start.sh"
    marker = tmp_path / "started"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nexec sleep 60\n")   # ignores its arguments
    script.chmod(0o755)
    began = time.monotonic()
    flags = probe([str(script), "--port", "{port}"], cwd=tmp_path, timeout=1.0)
    assert time.monotonic() - began < allowance(5)
    assert marker.exists() and flags.guessed and not flags.exact
    assert "did not end within 1 s" in flags.warning
    assert "comfyui.version (COMFYUI_VERSION_OVERRIDE)" in flags.warning
    assert not flags.knows("--disable-assets")
    # the checkout's comfyui_version.py, when there is one, names the version instead
    (tmp_path / "comfyui_version.py").write_text('__version__ = "0.38.1"\n')
    flags = probe([str(script)], cwd=tmp_path, timeout=1.0)
    assert not flags.guessed and flags.knows("--disable-assets")
    assert "comfyui_version.py says 0.38.1" in flags.source and flags.warning


@pytest.mark.real_processes
def test_a_missing_program_or_a_foreign_help_means_assumed_flags(tmp_path):
    flags = probe([str(tmp_path / "nothing" / "python"), "main.py"])
    assert flags.guessed and "could not ask ComfyUI" in flags.warning
    other = probe(["sh", "-c", "echo 'usage: start.sh BASE PORT'", "start"])
    assert other.guessed and "printed no ComfyUI usage" in other.warning


def test_comfyui_version_setting_is_used_without_asking(tmp_path):
    marker = tmp_path / "asked"
    flags = probe(["sh", "-c", f"touch {marker}", "x"], COMFYUI_VERSION_OVERRIDE="v0.38.1")
    assert not marker.exists()
    assert flags.knows("--models-directory") and "comfyui.version" in flags.source
    assert not probe(["x"], COMFYUI_VERSION_OVERRIDE="0.37.9").knows("--disable-assets")


@pytest.mark.real_comfyui
@pytest.mark.skipif(not os.environ.get("COMFYUI_TEST_COMMAND"),
                    reason="COMFYUI_TEST_COMMAND (a JSON list, run in COMFYUI_TEST_CWD) names a "
                           "real ComfyUI")
def test_a_real_comfyui_is_asked_too():
    command = json.loads(os.environ["COMFYUI_TEST_COMMAND"])
    flags = probe([*command, "--port", "{port}"], cwd=Path(os.environ["COMFYUI_TEST_CWD"]))
    assert flags.exact and flags.knows("--listen") and flags.knows("--user-directory")


def test_help_text_parsing_needs_comfyuis_usage():
    text = ("usage: main.py [-h] [--listen [IP]] [--port PORT]\n"
            "               [--cuda-malloc | --disable-cuda-malloc] [--fp8_e4m3fn-unet]\n\n"
            "options:\n  -h, --help            show this help message and exit\n"
            "  --listen [IP]         Specify the IP (see --port)\n")
    assert parse_help(text) == {"-h", "--help", "--listen", "--port", "--cuda-malloc",
                                "--disable-cuda-malloc", "--fp8_e4m3fn-unet"}
    assert parse_help("usage: start.sh BASE PORT\n") == frozenset()
    assert for_version("0.46.0", "x").knows("--disable-assets")
    assert not for_version("0.3.64", "x").knows("--models-directory")


def test_version_file_is_read_where_comfyui_is(tmp_path):
    assert version_file([tmp_path]) is None
    (tmp_path / "comfyui_version.py").write_text('# made\n__version__ = "0.3.64"\n')
    assert version_file([None, tmp_path]) == ("0.3.64", tmp_path / "comfyui_version.py")


# --- folders and database -------------------------------------------------------------------------
def test_models_and_user_directory_flags_move_their_folders_and_the_database(tmp_path):
    folders = discover(["main.py", "--base-directory", "/b", "--models-directory", "m",
                        "--user-directory=/u"], tmp_path, Path("/opt/ComfyUI"))
    assert folders.models.path == tmp_path / "m"
    assert folders.models.why == "from --models-directory in comfyui.command"
    assert folders.user.path == Path("/u") and folders.output.path == Path("/b/output")
    # the newest ComfyUI keeps its database in the user folder, 0.3.64 under its install folder
    assert folders.database(True, Path("/opt/ComfyUI")) == Path("/u/comfyui.db")
    assert folders.database(False, Path("/opt/ComfyUI")) == Path("/opt/ComfyUI/user/comfyui.db")
    given = discover(["main.py", "--database-url", "sqlite:///db/x.db"], tmp_path, None)
    assert given.database(False, None) == tmp_path / "db" / "x.db"
    memory = discover(["main.py", "--database-url", "sqlite:///:memory:"], tmp_path, None)
    assert memory.database(True, None) is None
    explicit = discover(["main.py", "--models-directory", "/m"], tmp_path, None,
                        {"models": Path("/set")})
    assert explicit.models.path == Path("/set")   # the setting still wins


# --- start-up failures ----------------------------------------------------------------------------
NEWEST = ComfyFlags(FLAGS_NEWEST, "asked", True)


def test_assets_failures_quote_the_failure_line_and_name_the_fix():
    lines = ["Starting server", "ASSETS_STARTUP_FAILED: missing_packages",
             "The assets system needs packages that could not be imported: sqlalchemy.",
             "python -m pip install -r requirements.txt",
             "Or start ComfyUI without the assets system: --disable-assets"]
    cause = exit_cause(lines, known=startup_failures(NEWEST, "on"))
    assert cause.startswith("ASSETS_STARTUP_FAILED: missing_packages (install sqlalchemy, "
                            "alembic and blake3")
    assert 'comfyui.assets = "off"' in cause
    # without the rules: the last line of advice, which is what an operator saw before
    assert exit_cause(lines).startswith("Or start ComfyUI without")
    in_use = exit_cause(["[ERROR] ASSETS_STARTUP_FAILED: in_use",
                         "Another ComfyUI is already using this database: '/u/comfyui.db'."],
                        known=startup_failures(NEWEST, "on"))
    assert in_use.startswith("ASSETS_STARTUP_FAILED: in_use (") and "{instance_folders}" in in_use
    for kind in ("locked", "not_writable", "corrupt", "newer_revision"):
        cause = exit_cause([f"ASSETS_STARTUP_FAILED: {kind}", "advice"],
                           known=startup_failures(NEWEST, "on"))
        assert cause.startswith(f"ASSETS_STARTUP_FAILED: {kind} (") and len(cause) > 60
    # assets already off but the flag not known: the fix is to say which ComfyUI runs
    from api.comfy.flags import assumed

    cause = exit_cause(["ASSETS_STARTUP_FAILED: missing_packages", "advice"],
                       known=startup_failures(assumed("x"), "off"))
    assert "comfyui.version" in cause


def test_a_busy_port_and_an_unknown_flag_name_the_fix():
    rules = startup_failures(NEWEST, "off")
    cause = exit_cause(["Port 18188 is already in use on address 127.0.0.1. Please close the "
                        "other application or use a different port with --port."], known=rules)
    assert "another program listens on port 18188" in cause
    old = exit_cause(["Traceback (most recent call last):", '  File "main.py", line 1',
                      "OSError: [Errno 98] error while attempting to bind on address "
                      "('127.0.0.1', 8188): address already in use"], known=rules)
    assert old.startswith("OSError: [Errno 98]") and "port 8188" in old
    flag = exit_cause(["usage: main.py [-h]", "main.py: error: unrecognized arguments: "
                       "--disable-assets"], known=rules)
    assert "this ComfyUI does not know --disable-assets" in flag


# --- the watcher ----------------------------------------------------------------------------------
@pytest.mark.real_processes
def test_the_watcher_reads_the_queue_from_the_jobs_api_where_comfyui_has_it(tmp_path, comfy_api):
    from api.comfy import ComfyClient
    from simulator.testing import start_simulator
    from supervisor.instances.watch import ComfyWatch
    from tests.support.procs import post_json
    from tests.support.workflows import sampler_graph

    async def watched(url: str) -> tuple[str, object]:
        client = ComfyClient(url)
        watch = ComfyWatch(client, output_at=lambda: None, interval=0.2)
        watch.start()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                activity = watch.activity()
                if activity.running and activity.pending == 2:
                    return watch.source, activity
                await asyncio.sleep(0.1)
            raise AssertionError(f"the watcher saw {watch.activity()}")
        finally:
            await watch.stop()
            await client.close()

    with start_simulator(tmp_path, "--step-seconds", "1") as sim:
        for seed in range(3):   # one runs (hours), two wait
            graph = sampler_graph(10_000)
            graph["3"]["inputs"]["seed"] = seed
            assert post_json(sim.url + "/prompt", {"prompt": graph, "client_id": "t"})[0] == 200
        source, activity = asyncio.run(watched(sim.url))
    assert source == ("GET /api/jobs" if comfy_api == "0.38.1" else "GET /queue")
    assert activity.seconds_since_progress is not None


def test_a_flag_its_help_lacks_is_fatal_for_main_py_and_maybe_a_start_scripts_own():
    from supervisor.instances.instance import _unknown_flags_warning

    direct = _unknown_flags_warning(["venv/bin/python", "main.py", "--comfy-base", "B"],
                                    ["--comfy-base"])
    assert direct.endswith("it will exit 2; remove it from comfyui.command")
    script = _unknown_flags_warning(["/opt/start-comfyui.sh", "--comfy-base", "B"],
                                    ["--comfy-base"])
    assert "unless start-comfyui.sh takes it itself, ComfyUI will exit 2" in script
    assert "it will exit 2;" not in script
