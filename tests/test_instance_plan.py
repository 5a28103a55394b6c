"""Which GPUs get an instance, and the command lines each instance gets (no processes)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from benchmark.siblings import SiblingFigure, judge_siblings
from config import load_settings
from config.loader import SettingsError
from supervisor.instances.plan import (
    PLACEHOLDERS,
    GpuSlot,
    PlanError,
    collisions,
    plan_instances,
    select_gpus,
)
from supervisor.state import WorkerState, combine


def gpu(index: int, name: str = "NVIDIA H100 80GB HBM3", available: bool = True):
    return SimpleNamespace(index=index, uuid=f"GPU-{index:04d}", name=name, available=available)


GPUS = [gpu(0), gpu(1), gpu(2), gpu(3)]
TEMPLATE = ["python", "main.py", "--listen", "127.0.0.1", "--port", "{port}",
            "{instance_folders}"]


def settings(**env: str):
    return load_settings(None, environ={"COMFYUI_COMMAND": json.dumps(TEMPLATE),
                                        "COMFYUI_CWD": "/srv/comfy",
                                        "COMFYUI_INSTALL_PATH": "/srv/comfy",
                                        "WORKER_STATE_DIR": "/var/lib/cw", **env})


# --- which GPUs ---------------------------------------------------------------------------------
def test_all_gives_every_usable_gpu_an_instance_in_index_order():
    lost = gpu(4, available=False)
    slots = select_gpus("all", [*GPUS, lost], templated=True)
    assert [s.index for s in slots] == [0, 1, 2, 3]
    assert slots[2].uuid == "GPU-0002"


def test_indexes_and_uuids_choose_and_order_the_instances():
    assert [s.index for s in select_gpus(["3", "1"], GPUS, templated=True)] == [3, 1]
    assert [s.index for s in select_gpus(["gpu-0002"], GPUS, templated=True)] == [2]


def test_a_gpu_that_is_not_there_names_the_setting_and_what_was_found():
    with pytest.raises(PlanError) as caught:
        select_gpus(["7"], GPUS, templated=True)
    assert "comfyui.gpus (COMFYUI_GPUS)" in str(caught.value)
    assert "0 GPU-0000" in str(caught.value)


def test_no_gpu_runs_one_instance_without_a_gpu():
    assert select_gpus("all", [], templated=True) == [GpuSlot()]


def test_a_command_without_placeholders_runs_one_instance_as_before():
    assert select_gpus("all", GPUS, templated=False) == [GpuSlot()]
    with pytest.raises(PlanError, match=r"--port \{port\}"):
        select_gpus(["0", "1"], GPUS, templated=False)


def test_the_setting_reads_all_indexes_or_uuids_and_refuses_a_mixture():
    assert settings(COMFYUI_GPUS="0, 2").comfyui.gpus == ["0", "2"]
    assert settings(COMFYUI_GPUS="ALL").comfyui.gpus == "all"
    for bad in ("0,GPU-1", "1,1", "first"):
        with pytest.raises(SettingsError, match="COMFYUI_GPUS"):
            settings(COMFYUI_GPUS=bad)


# --- command lines ------------------------------------------------------------------------------
def test_each_instance_gets_its_ports_gpu_and_own_folders_while_models_stay_shared():
    plans = plan_instances(settings(), select_gpus("all", GPUS, templated=True))
    assert [p.comfyui_url for p in plans] == [f"http://127.0.0.1:{18188 + i}" for i in range(4)]
    assert [p.wrapper_url for p in plans] == [f"http://127.0.0.1:{18288 + i}" for i in range(4)]
    two = plans[2]
    assert two.comfyui.env["CUDA_VISIBLE_DEVICES"] == "GPU-0002"
    command = two.comfyui.command
    assert command[command.index("--port") + 1] == "18190"
    assert command[command.index("--output-directory") + 1] == "/srv/comfy/instances/2/output"
    assert command[command.index("--user-directory") + 1] == "/srv/comfy/instances/2/user"
    assert command[command.index("--database-url") + 1] == \
        "sqlite:////srv/comfy/instances/2/user/comfyui.db"
    assert str(two.folders.temp.path) == "/srv/comfy/instances/2/temp"
    assert {str(p.folders.models.path) for p in plans} == {"/srv/comfy/models"}
    assert str(two.state_dir) == "/var/lib/cw/instances/2"
    # made before ComfyUI starts: it refuses a --user-directory that does not exist
    assert "/srv/comfy/instances/2/user" in {str(p) for p in two.make_dirs}


def test_one_instance_keeps_the_folders_ports_and_state_of_a_one_gpu_host():
    (plan,) = plan_instances(settings(), select_gpus("all", GPUS[:1], templated=True))
    assert plan.comfyui.command == ["python", "main.py", "--listen", "127.0.0.1", "--port",
                                    "18188"]
    assert str(plan.folders.output.path) == "/srv/comfy/output"
    assert str(plan.state_dir) == "/var/lib/cw" and plan.suffix == "" and not plan.make_dirs


def test_placeholders_fill_env_and_wrapper_command_and_other_braces_stay():
    s = settings(COMFYUI_ENV=json.dumps({"TAG": "gpu{gpu_index}-{gpu_name}", "RAW": "{x}"}),
                 WRAPPER_COMMAND=json.dumps(["wrap", "--port", "{port}", "--comfy",
                                             "{comfyui_url}", "{\"a\": 1}"]))
    plan = plan_instances(s, select_gpus("all", GPUS, templated=True))[1]
    assert plan.comfyui.env["TAG"] == "gpu1-NVIDIA H100 80GB HBM3"
    assert plan.comfyui.env["RAW"] == "{x}"
    assert plan.wrapper.command == ["wrap", "--port", "18289", "--comfy",
                                    "http://127.0.0.1:18189", "{\"a\": 1}"]
    assert {"port", "instance", "gpu_uuid", "instance_folders"} <= set(PLACEHOLDERS)


def test_config_check_refuses_a_shared_database_and_warns_of_other_collisions(tmp_path):
    from supervisor.commands.cli import main

    shared = tmp_path / "shared.toml"
    shared.write_text('[comfyui]\ncommand = ["python", "main.py", "--port", "{port}"]\n'
                      '[wrapper]\ncommand = ["wrap", "--port", "9000"]\n')
    result = CliRunner().invoke(main, ["config", "check", str(shared)])
    assert result.exit_code == 2, result.output
    assert "instances 0 and 1 would share ComfyUI's SQLite database" in result.output
    assert "ASSETS_STARTUP_FAILED: in_use" in result.output and "{instance_folders}" in result.output
    assert "OK" not in result.output
    # Each instance its own user folder but no --database-url: 0.3.64 keeps the database under
    # its install folder whatever --user-directory says; without comfyui.version that is refused.
    users = tmp_path / "users.toml"
    users.write_text('[comfyui]\ncommand = ["python", "main.py", "--port", "{port}", '
                     '"--output-directory", "/o/{instance}", "--input-directory", "/i/{instance}", '
                     '"--temp-directory", "/t/{instance}", "--user-directory", "/u/{instance}"]\n')
    result = CliRunner().invoke(main, ["config", "check", str(users)])
    assert result.exit_code == 2 and "ComfyUI 0.3.64 keeps it under" in result.output, \
        result.output
    # ... the newest ComfyUI keeps it in the user folder: told which runs, the plan passes.
    users.write_text(users.read_text() + 'version = "0.38.1"\n')
    result = CliRunner().invoke(main, ["config", "check", str(users)])
    assert result.exit_code == 0, result.output
    # What is only a warning: the same output folder, a wrapper started the same way.
    warned = tmp_path / "warned.toml"
    warned.write_text('[comfyui]\ncommand = ["python", "main.py", "--port", "{port}", '
                      '"--database-url", "sqlite:////db/{instance}.db"]\n'
                      '[wrapper]\ncommand = ["wrap", "--port", "9000"]\n')
    result = CliRunner().invoke(main, ["config", "check", str(warned)])
    assert result.exit_code == 0, result.output
    assert "instances would share the output folder" in result.output
    assert "wrapper.command: every instance's wrapper would start the same way" in result.output
    good = tmp_path / "good.toml"
    good.write_text('[comfyui]\ncommand = ["python", "main.py", "--port", "{port}", '
                    '"{instance_folders}"]\n')
    result = CliRunner().invoke(main, ["config", "check", str(good)])
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    assert not collisions(load_settings(good, environ={}))


def test_config_check_passes_a_shared_database_when_only_one_gpu_is_named(tmp_path):
    """comfyui.gpus naming one GPU runs one instance whatever the host has: nothing to share."""
    from supervisor.commands.cli import main

    one = tmp_path / "one.toml"
    one.write_text('[comfyui]\ngpus = [0]\ncommand = ["python", "main.py", "--port", "{port}", '
                   '"--base-directory", "/b"]\n')
    result = CliRunner().invoke(main, ["config", "check", str(one)])
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    # Two GPUs named: two instances on one database, refused as before.
    one.write_text(one.read_text().replace("gpus = [0]", "gpus = [0, 1]"))
    result = CliRunner().invoke(main, ["config", "check", str(one)])
    assert result.exit_code == 2 and "would share ComfyUI's SQLite database" in result.output


def test_the_worker_passes_only_flags_this_comfyui_knows():
    from api.comfy.flags import FLAGS_0_3_64, FLAGS_NEWEST, ComfyFlags

    old = ComfyFlags(FLAGS_0_3_64, "asked", True)
    new = ComfyFlags(FLAGS_NEWEST, "asked", True)
    s = settings(COMFYUI_MODELS_DIR="/data/models")
    (plan,) = plan_instances(s, [GpuSlot()], old)
    assert "--disable-assets" not in plan.comfyui.command
    assert "--models-directory" not in plan.comfyui.command
    assert plan.assets.mode.value == "none"
    plans = plan_instances(s, select_gpus("all", GPUS[:2], templated=True), new)
    command = plans[1].comfyui.command
    # after the instance's own folders, where {instance_folders} stood
    assert command[-3:] == ["--disable-assets", "--models-directory", "/data/models"], command
    assert command.count("--disable-assets") == 1
    assert plans[1].assets.mode.value == "off"
    assert str(plans[1].assets.database) == "/srv/comfy/instances/1/user/comfyui.db"
    assert "/data/models" in {str(p) for p in plans[1].make_dirs}   # ComfyUI needs it to exist
    # comfyui.assets = "on": ComfyUI's default is left alone
    (plan,) = plan_instances(settings(COMFYUI_ASSETS="on"), [GpuSlot()], new)
    assert "--disable-assets" not in plan.comfyui.command and plan.assets.mode.value == "on"
    # a flag 0.3.64 lacked is not in {instance_folders} of a ComfyUI without it
    bare = ComfyFlags(FLAGS_0_3_64 - {"--database-url"}, "asked", True)
    command = plan_instances(s, select_gpus("all", GPUS[:2], templated=True), bare)[0] \
        .comfyui.command
    assert "--database-url" not in command and "--user-directory" in command
    # not known at all (asking failed): nothing beyond the folders, and assets unknown
    from api.comfy.flags import assumed

    plans = plan_instances(s, select_gpus("all", GPUS[:2], templated=True), assumed("x"))
    assert "--disable-assets" not in plans[0].comfyui.command
    assert plans[0].assets.mode.value == "unknown"


def test_a_plan_on_one_database_is_refused_with_the_fix():
    from api.comfy.flags import FLAGS_NEWEST, ComfyFlags
    from supervisor.instances.plan import refusals

    new = ComfyFlags(FLAGS_NEWEST, "asked", True)
    shared = settings(COMFYUI_COMMAND=json.dumps(["python", "main.py", "--port", "{port}",
                                                  "--base-directory", "/b"]))
    plans = plan_instances(shared, select_gpus("all", GPUS, templated=True), new)
    (problem,) = refusals(plans, new)
    assert "instances 0 and 1 would share ComfyUI's SQLite database /b/user/comfyui.db" in problem
    assert "{instance_folders}" in problem
    assert refusals(plan_instances(settings(), select_gpus("all", GPUS, templated=True), new),
                    new) == []
    memory = settings(COMFYUI_COMMAND=json.dumps(["python", "main.py", "--port", "{port}",
                                                  "--database-url", "sqlite:///:memory:"]))
    assert refusals(plan_instances(memory, select_gpus("all", GPUS, templated=True), new),
                    new) == []


# --- siblings and the worker state ---------------------------------------------------------------
def test_a_gpu_30_percent_slower_than_its_siblings_median_is_slow():
    figures = [SiblingFigure(i, "H100", its) for i, its in enumerate((10.0, 9.9, 7.7, 10.1))]
    judged = judge_siblings(figures, 0.20)
    assert [judged[i].slow for i in range(4)] == [False, False, True, False]
    assert "30% slower than the median of its 3 sibling GPUs" in judged[2].text()
    # Another model is no sibling; a lone GPU has none.
    assert judge_siblings([SiblingFigure(0, "H100", 10), SiblingFigure(1, "L4", 3)], 0.2) == {}


def test_worker_state_is_derived_from_the_instances():
    ready = ("instance 0", WorkerState.READY, "ok")
    out = ("instance 1 (GPU 1)", WorkerState.UNHEALTHY, "GPU 1: HW thermal slowdown")
    starting = ("instance 2", WorkerState.STARTING, "waiting for ComfyUI")
    assert combine([ready]) == (WorkerState.READY, "ok")
    assert combine([out]) == (WorkerState.UNHEALTHY, "GPU 1: HW thermal slowdown")
    assert combine([ready, ready])[0] is WorkerState.READY
    state, reason = combine([ready, out])
    assert state is WorkerState.DEGRADED and "1 of 2 instances serve" in reason
    assert "instance 1 (GPU 1) unhealthy: GPU 1: HW thermal slowdown" in reason
    assert combine([out, starting])[0] is WorkerState.STARTING
    assert combine([out, out])[0] is WorkerState.UNHEALTHY


def test_the_demo_plays_a_host_with_the_gpus_asked_for(tmp_path):
    from supervisor.commands.demo import demo_environment
    from supervisor.gpu.nvml import NvmlReader

    env = demo_environment(tmp_path, 3000, "tok", gpus=4)
    s = load_settings(None, environ=env)
    reader = NvmlReader(fake_source=s.gpu.fake_source)
    try:
        snapshot = reader.snapshot()
    finally:
        reader.close()
    plans = plan_instances(s, select_gpus(s.comfyui.gpus, snapshot.gpus, templated=True))
    assert [p.gpu.index for p in plans] == [0, 1, 2, 3]
    assert len({p.comfyui_url for p in plans} | {p.wrapper_url for p in plans}) == 8
    assert not collisions(s)
    # One GPU: the demo as it always was.
    assert "{port}" not in demo_environment(tmp_path / "one", 3000, "tok")["COMFYUI_COMMAND"]
