"""Untidy real hosts: someone else's wrapper, a stranger on a port (issue 11, defects 1 and 3).

Real processes and sockets throughout: the daemon, the simulator as ComfyUI, and as `[wrapper]` a
stand-in that speaks only the ai-dock wrapper's formats (tests/support/aidock_standin.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.support import procs
from tests.support.bench import NOT_JUDGED, bench_env, settled
from tests.support.procs import (
    ROOT,
    base_env,
    free_port,
    get_json,
    post_json,
    start_daemon,
    wait_until,
)
from tests.support.workflows import sampler_graph, tiny_workflow

TINY = tiny_workflow("t")


def set_knobs(comfy_url: str, **knobs) -> None:
    request = urllib.request.Request(comfy_url + "/__sim__/knobs", data=json.dumps(knobs).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()


def child_reason(worker, name: str, needle: str) -> str | None:
    """The child's state reason once it contains ``needle`` (None before, or while the admin
    socket is not up yet)."""
    try:
        reason = worker.status()["children"][name]["reason"]
    except Exception:
        return None
    return reason if needle in reason else None


def aidock_env(tmp_path, wrapper_port: int, **extra) -> dict:
    command = [sys.executable, "-m", "tests.support.aidock_standin", "--port", str(wrapper_port)]
    return {"WRAPPER_COMMAND": json.dumps(command), "WRAPPER_CWD": str(ROOT),
            "COMFYUI_INSTALL_PATH": str(tmp_path / "comfy"), **extra}


@pytest.mark.e2e
@pytest.mark.slow
def test_aidock_wrapper_reaches_ready_benchmarks_serves_and_a_stall_is_caught(tmp_path):
    wrapper_port = free_port()
    env = aidock_env(tmp_path, wrapper_port, **bench_env(
        BENCHMARK_TEST_STEPS="6", **NOT_JUDGED),
        SUPERVISOR_STALL_TIMEOUT="3")
    with start_daemon(tmp_path, "--step-seconds", "0.05", wait_ready=False, extra_env=env,
                      wrapper_port=wrapper_port) as worker:
        status, body = settled(worker)
        assert status == 200 and body["state"] == "ready", (body, worker.log()[-3000:])
        bench = worker.status()["benchmark"]
        assert bench["status"] in ("pass", "no_reference") and bench["seconds"] > 0, bench

        status, result = worker.generate({"input": {"workflow_json": TINY}})
        assert status == 200 and result["status"] == "completed", result
        assert open(result["output"][0]["local_path"], "rb").read(4) == b"\x89PNG"

        # Steps 0.8 s apart over ~5 s, longer than the 3 s stall limit: progress is seen in
        # ComfyUI's own output, so this is not a stall (the stand-in reports no progress).
        set_knobs(worker.comfy_url, step_seconds=0.8)
        status, result = worker.generate({"input": {"workflow_json": sampler_graph(6)}})
        assert status == 200, result
        assert worker.status()["children"]["comfyui"]["restarts"] == 0

        # A step that never ends: the daemon, not the wrapper, notices and restarts ComfyUI.
        set_knobs(worker.comfy_url, step_seconds=600)
        started = time.monotonic()
        status, result = worker.generate({"input": {"workflow_json": sampler_graph(4)}},
                                         timeout=60)
        assert status == 502, result
        assert time.monotonic() - started < 30
        assert "made no progress" in worker.log()
        wait_until(lambda: worker.status()["children"]["comfyui"]["restarts"] >= 1, 30,
                   "ComfyUI to be restarted")


@pytest.mark.e2e
def test_a_hung_comfyui_is_restarted_alone_and_the_aidock_wrapper_is_left_running(tmp_path):
    """The ai-dock wrapper's /health asks ComfyUI and waits seconds for it, so while ComfyUI
    hangs the wrapper cannot answer a probe in time either. Only ComfyUI is killed for the hang:
    the wrapper did nothing wrong (killing it would drop its in-memory queue), and the client
    hears that ComfyUI hung, not that the wrapper vanished."""
    import signal
    import threading

    wrapper_port = free_port()
    with start_daemon(tmp_path, "--step-seconds", "0.3",
                      extra_env=aidock_env(tmp_path, wrapper_port),
                      wrapper_port=wrapper_port) as worker:
        wrapper_pid, comfy_pid = worker.child_pid("wrapper"), worker.child_pid("comfyui")
        answer: dict = {}
        client = threading.Thread(target=lambda: answer.update(
            zip(("status", "body"), worker.generate({"input": {"workflow_json": sampler_graph(40)}},
                                                    timeout=60))))
        client.start()
        time.sleep(1.5)
        os.kill(comfy_pid, signal.SIGSTOP)
        client.join(60)
        assert answer.get("status") == 502, answer
        # Ours says "error"; an ai-dock-style result says "message".
        said = answer["body"].get("error") or answer["body"].get("message") or ""
        assert "ComfyUI" in said and "wrapper did not answer" not in said, answer
        wait_until(lambda: worker.status()["children"]["comfyui"]["restarts"] >= 1
                   and worker.status()["worker"]["state"] == "ready", 40, "ComfyUI restarted and ready")
        children = worker.status()["children"]
        assert children["wrapper"]["pid"] == wrapper_pid, children["wrapper"]
        assert children["wrapper"]["restarts"] == 0, children["wrapper"]
        status, result = worker.generate({"input": {"workflow_json": TINY}})
        assert status == 200 and result["status"] == "completed", result


@pytest.mark.e2e
def test_stranger_on_comfyuis_port_is_never_adopted(tmp_path):
    comfy_port = free_port()
    # A leftover ComfyUI (here the simulator, which answers every probe) on our ComfyUI's port.
    stranger = procs.popen(
        [sys.executable, "-m", "simulator", "--listen", "127.0.0.1", "--port", str(comfy_port),
         "--base-directory", str(tmp_path / "stranger-base")],
        cwd=ROOT, env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: get_json(f"http://127.0.0.1:{comfy_port}/system_stats")[0] == 200,
                   30, "the stranger to listen")
        with start_daemon(tmp_path, wait_ready=False, comfy_port=comfy_port) as worker:
            text = wait_until(lambda: child_reason(worker, "comfyui", f"held by pid {stranger.pid}"),
                              30, "the comfyui child to name the stranger")
            assert f"port {comfy_port} is held by pid {stranger.pid} (" in text
            assert "simulator" in text and "not by our ComfyUI (pid " in text
            status, health = get_json(worker.url + "/health")
            assert status == 503
            assert f"held by pid {stranger.pid}" in json.dumps(health)
            assert worker.status()["children"]["comfyui"]["state"] != "ready"
            assert f"held by pid {stranger.pid}" in worker.log()
            from click.testing import CliRunner

            from supervisor.commands.cli import main

            shown = CliRunner().invoke(main, ["health"], env={
                "WORKER_ADMIN_SOCKET": str(worker.admin_socket), "NO_COLOR": "1"})
            assert f"held by pid {stranger.pid}" in shown.output, shown.output
            # Logged once per holder and child, not once per probe (every 0.5 s here).
            time.sleep(3)
            said = [line.split(" supervisor.children.child: ", 1)[-1] for line in worker.log().splitlines()
                    if "ERROR" in line and f"held by pid {stranger.pid}" in line]
            assert said and len(said) == len(set(said)), said
    finally:
        stranger.kill()
        stranger.wait(10)


@pytest.mark.e2e
def test_stranger_on_the_wrapper_port_and_the_public_port_is_named(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    (tmp_path / "w").mkdir()
    (tmp_path / "p").mkdir()
    try:
        with start_daemon(tmp_path / "w", wait_ready=False, wrapper_port=port) as worker:
            text = wait_until(lambda: child_reason(worker, "wrapper", f"held by pid {os.getpid()}"),
                              30, "the wrapper child to name the holder")
            assert f"port {port} is held by pid {os.getpid()} (" in text
            assert "not by our wrapper" in text
        with start_daemon(tmp_path / "p", wait_ready=False, port=port, stop=False) as worker:
            worker.process.wait(60)
            assert worker.process.returncode == 1
            assert f"port {port} is already held by pid {os.getpid()} (" in worker.log()
    finally:
        holder.close()


@pytest.mark.real_processes
@pytest.mark.parametrize("order", ["before", "after"])
def test_config_option_before_or_after_the_subcommand(tmp_path, order):
    path = tmp_path / "worker.toml"
    path.write_text("[worker]\nport = 4321\n")
    args = ["--config", str(path), "config", "show", "--json"] if order == "before" else \
        ["config", "show", "--json", "--config", str(path)]
    done = procs.run([sys.executable, "-m", "supervisor.commands.cli", *args], cwd=ROOT,
                     env=base_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)["settings"]}
    assert rows["worker.port"]["value"] == 4321


@pytest.mark.real_processes
def test_health_finds_a_running_demo_and_a_second_demo_names_the_port_holder(tmp_path):
    public, comfy, wrapper = free_port(), free_port(), free_port()
    env = base_env(
        XDG_RUNTIME_DIR=str(tmp_path / "run"), BENCHMARK_ENABLED="false",
        METRICS_PORT=str(free_port()),
        COMFYUI_URL=f"http://127.0.0.1:{comfy}", WRAPPER_URL=f"http://127.0.0.1:{wrapper}",
        COMFYUI_COMMAND=json.dumps([sys.executable, "-m", "simulator", "--listen", "127.0.0.1",
                                    "--port", str(comfy), "--base-directory",
                                    str(tmp_path / "comfy")]))
    (tmp_path / "run").mkdir()
    log = open(tmp_path / "demo.log", "wb")
    demo = procs.popen([sys.executable, "-m", "supervisor.commands.cli", "demo", "--port", str(public),
                        "--state", str(tmp_path / "demo")], cwd=ROOT, env=env, stdout=log,
                       stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: get_json(f"http://127.0.0.1:{public}/health")[0] == 200, 60,
                   "the demo to be ready")
        # No WORKER_ADMIN_SOCKET, no --socket: the demo's own note leads there.
        shown = procs.run([sys.executable, "-m", "supervisor.commands.cli", "health", "--json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert json.loads(shown.stdout)["worker"]["pid"] == demo.pid
        again = procs.run([sys.executable, "-m", "supervisor.commands.cli", "demo", "--port",
                           str(public), "--state", str(tmp_path / "demo2")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 1
        assert f"the public port (--port) {public} is held by pid {demo.pid} (" in again.stderr
    finally:
        demo.terminate()
        demo.wait(30)
        log.close()


def hiding_script(tmp_path) -> str:
    """Like the operator's comfyui-cmd.sh BASE PORT: the folder flags live inside the script."""
    script = tmp_path / "comfyui-cmd.sh"
    script.write_text("#!/bin/sh\n"
                      f"PYTHONPATH={ROOT} exec {sys.executable} -m simulator --listen 127.0.0.1 "
                      '--port "$2" --base-directory "$1"\n')
    script.chmod(0o755)
    return str(script)


@pytest.mark.e2e
def test_folders_hidden_in_a_script_are_read_from_the_running_comfyui(tmp_path):
    """comfyui.command is a script with a *relative* --base-directory inside: the daemon and its
    wrapper read ComfyUI's real command line and working folder, so outputs land under that base
    folder and nothing is written into the ComfyUI checkout (comfyui.install_path)."""
    comfy_port = free_port()
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    real_base = tmp_path / "run" / "real-base"
    (tmp_path / "run").mkdir()
    env = {"COMFYUI_COMMAND": json.dumps([hiding_script(tmp_path), "real-base", str(comfy_port)]),
           "COMFYUI_CWD": str(tmp_path / "run"), "COMFYUI_INSTALL_PATH": str(checkout),
           "COMFYUI_OUTPUT_DIR": None}
    with start_daemon(tmp_path, extra_env=env, comfy_port=comfy_port) as worker:
        comfy_pid = worker.child_pid("comfyui")
        folders = wait_until(
            lambda: (lambda f: f if f["output"]["path"] == str(real_base / "output") else None)(
                worker.status()["instances"][0]["folders"]), 30, "the daemon to read the folders")
        assert folders["output"]["why"] == \
            f"from --base-directory in ComfyUI's running command (pid {comfy_pid}), then output/"
        assert folders["models"]["path"] == str(real_base / "models")
        # Models would have been provided into the guess: the operator is told what to set.
        events = [e["event"] for e in worker.status()["events"]]
        assert any("set comfyui.models_dir" in e and str(real_base / "models") in e
                   for e in events), events
        # The disk guard watches the folders ComfyUI really writes to, not the guess.
        watched = wait_until(lambda: (lambda paths: paths if str(real_base / "output") in paths
                                      else None)([p for fs in worker.status()["disk"]["filesystems"]
                                                  for p in fs["paths"].values()]),
                             30, "the disk guard to watch the real output folder")
        assert not any(p.startswith(str(checkout)) for p in watched), watched
        log = worker.log()
        assert f"ComfyUI's output folder is {real_base / 'output'} (from --base-directory in " \
               f"ComfyUI's running command (pid {comfy_pid}), then output/), not " \
               f"{checkout / 'output'} (comfyui.install_path, then output/)" in log, log[-3000:]

        status, result = worker.generate({"input": {"workflow_json": TINY}})
        assert status == 200 and result["status"] == "completed", result
        entry = result["output"][0]
        assert entry["local_path"].startswith(str(real_base / "output") + os.sep), entry
        assert not entry.get("fetched_via_view"), entry
        assert open(entry["local_path"], "rb").read(4) == b"\x89PNG"
        assert not (checkout / "output").exists()
        assert "not under" not in worker.log()  # no GET /view fallback was needed


@pytest.mark.real_processes
def test_a_wrapper_on_its_own_asks_system_stats_argv_for_the_output_folder(tmp_path):
    """No daemon to read the process: the wrapper takes ComfyUI's folders from GET /system_stats
    `system.argv`; a relative --base-directory there is taken from comfyui.install_path (where
    this ComfyUI runs), and the log says so."""
    comfy_port, wrapper_port = free_port(), free_port()
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    comfy = procs.popen(
        [sys.executable, "-m", "simulator", "--listen", "127.0.0.1", "--port", str(comfy_port),
         "--base-directory", "rel-base"],
        cwd=checkout, env=base_env(PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    log_path = tmp_path / "wrapper.log"
    env = base_env(COMFYUI_URL=f"http://127.0.0.1:{comfy_port}", COMFYUI_INSTALL_PATH=str(checkout),
                   COMFYUI_COMMAND=json.dumps(["./start-comfyui.sh"]),
                   WORKER_STATE_DIR=str(tmp_path / "state"), API_PORT=str(wrapper_port))
    with open(log_path, "ab") as log:
        wrapper = procs.popen([sys.executable, "-m", "supervisor.commands.cli", "api"], cwd=ROOT,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{wrapper_port}"
        wait_until(lambda: get_json(url + "/health")[0] == 200, 60, "the wrapper to be ready")
        status, result = post_json(url + "/generate/sync", {"input": {"workflow_json": TINY}})
        assert status == 200 and result["status"] == "completed", result
        real = checkout / "rel-base" / "output"
        assert result["output"][0]["local_path"].startswith(str(real) + os.sep), result
        assert not (checkout / "output").exists()
        text = log_path.read_text()
        assert f"ComfyUI's output folder is {real} (from --base-directory in ComfyUI's GET " \
               "/system_stats argv, then output/)" in text, text[-2000:]
        assert "/system_stats tells no working folder" in text
    finally:
        for process in (wrapper, comfy):
            process.terminate()
            process.wait(15)


@pytest.mark.e2e
def test_a_comfyui_that_dies_at_start_says_why_in_health(tmp_path):
    """Like ComfyUI 0.3.64 with a --base-directory that has no custom_nodes/: a traceback, exit
    1. /health and `comfy-worker health` carry the exception line, also once it is a crash loop."""
    missing = tmp_path / "base" / "custom_nodes"
    crash = ("import os\nprint('Starting server', flush=True)\n"
             "def execute_prestartup_script():\n"
             f"    os.listdir({str(missing)!r})\n"
             "execute_prestartup_script()\n")
    env = {"COMFYUI_COMMAND": json.dumps([sys.executable, "-c", crash]),
           "SUPERVISOR_CRASH_LOOP_COUNT": "3"}
    cause = f"FileNotFoundError: [Errno 2] No such file or directory: '{missing}'"

    def health_reason():
        status, body = get_json(worker.url + "/health")
        text = json.dumps(body)
        return body if status == 503 and "crash loop" in text and cause in text else None

    with start_daemon(tmp_path, wait_ready=False, extra_env=env) as worker:
        body = wait_until(health_reason, 60, "/health to name the crash's cause")
        assert f"last: exited with code 1: {cause}" in json.dumps(body)
        assert "Traceback" not in json.dumps(body)
        from click.testing import CliRunner

        from supervisor.commands.cli import main

        shown = CliRunner().invoke(main, ["health"], env={
            "WORKER_ADMIN_SOCKET": str(worker.admin_socket), "NO_COLOR": "1"})
        assert cause in shown.output, shown.output
        assert f"exited with code 1: {cause}" in worker.log()
