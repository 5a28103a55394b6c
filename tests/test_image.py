"""The container image, built here with podman from a clean copy of the checkout, and run.

The image is built once for the module (FROM a minimal Debian made from Debian's packages, see
tests/support/image_harness.py), then started read-only, with host folders as its state, log and output
volumes and the simulator as ComfyUI. Skipped, with the reason, where podman cannot run
(`make system-tools` installs it as root).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from config import load_settings
from supervisor.daemon.daemon import stop_budget
from tests.support import image_harness as harness  # test helpers: one import to move

pytestmark = [pytest.mark.image, pytest.mark.timeout(900)]

TOKEN = "image-test-token"
READY_WITHIN = 180.0  # seconds: a failure bound for a start, not a speed claim
PNG = b"\x89PNG\r\n\x1a\n"


def _report(request: pytest.FixtureRequest, line: str) -> None:
    """A figure, in the run's output even without -s (unlike print)."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if reporter is None or capture is None:
        print(f"[image] {line}")
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"[image] {line}")


def _get(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _generate(url: str, steps: int, timeout: float = 120.0) -> tuple[int, dict]:
    body = {"input": {"modifier": "Text2Image", "modifications": {
        "prompt": "a lighthouse", "width": 64, "height": 64, "steps": steps}}}
    request = urllib.request.Request(
        f"{url}/generate/sync", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _wait_ready(container: harness.Container) -> float:
    """Seconds from `podman run` to /health 200."""
    deadline = container.started_at + READY_WITHIN
    while time.monotonic() < deadline:
        try:
            status, _ = _get(f"{container.url}/health", timeout=2)
        except (OSError, ValueError):
            status = 0
        if status == 200:
            return time.monotonic() - container.started_at
        if container.state().get("Status") == "exited":
            break
        time.sleep(0.2)
    raise AssertionError(f"not ready within {READY_WITHIN} s:\n{container.logs()[-4000:]}")


def _env() -> dict[str, str]:
    return {**harness.simulator_env(), "WORKER_AUTH_TOKEN": TOKEN}


@pytest.fixture(scope="module")
def image(request):
    reason = harness.unusable_reason()
    if reason:
        pytest.skip(f"the image cannot be built here: {reason}")
    # A tag of this run's own: another run on this machine may build other sources meanwhile.
    tag = f"{harness.TAG}-{os.getpid()}"
    build = harness.build_image(tag, log=lambda line: _report(request, line))
    _report(request, build.describe())
    yield build
    harness.podman("rmi", tag, check=False)  # its layers stay, as the next build's cache


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    return harness.volume_folders(tmp_path_factory.mktemp("image-volumes"))


@pytest.fixture(scope="module")
def first(image, volumes, request):
    container = harness.Container(image.tag, _env(), extra=harness.volume_args(volumes)).start()
    try:
        container.ready_seconds = _wait_ready(container)
        _report(request, f"first start to ready (benchmark included): "
                         f"{container.ready_seconds:.1f} s")
        yield container
    finally:
        container.remove()


def test_health_answers_and_the_main_process_is_not_root(first):
    status, body = _get(f"{first.url}/health")
    assert status == 200, body
    daemon = first.exec("cat", "/proc/1/task/1/children").stdout.split()[0]
    uids = first.exec("stat", "-c", "%u", "/proc/1", f"/proc/{daemon}").stdout.split()
    assert uids == [str(harness.IMAGE_UID)] * 2, uids
    users = (harness.podman("top", first.name, "user", "args").stdout or "").splitlines()[1:]
    assert users and all(line.split()[0] == "comfy-worker" for line in users), users
    assert "/usr/bin/tini -- comfy-worker run" in users[0], users


def test_the_benchmark_takes_its_prompts_from_the_installed_package(first):
    # No BENCHMARK_PROMPTS_FILE in the image: the prompts are package data of the wheel.
    env = first.exec("sh", "-c", "tr '\\0' '\\n' < /proc/1/environ").stdout
    assert "BENCHMARK_PROMPTS_FILE" not in env, env
    logs = first.logs()
    assert "benchmark" in logs and "using built-in prompts" not in logs, logs[-3000:]


def test_a_request_leaves_its_png_in_the_output_volume(first, volumes):
    status, body = _generate(first.url, steps=4)
    assert status == 200, body
    (output,) = body["output"]
    inside = Path(output["local_path"])
    assert inside.is_relative_to("/opt/ComfyUI/output"), output
    on_host = volumes["output"] / inside.relative_to("/opt/ComfyUI/output")
    assert on_host.read_bytes().startswith(PNG)


def test_healthcheck_follows_the_daemons_liveness(first):
    assert harness.podman("healthcheck", "run", first.name, check=False).returncode == 0
    daemon = first.exec("cat", "/proc/1/task/1/children").stdout.split()[0]
    # A wedged daemon: its event loop answers nothing.
    first.exec("sh", "-c", f"kill -STOP {daemon}", check=True)
    try:
        stuck = harness.podman("healthcheck", "run", first.name, check=False)
    finally:
        first.exec("sh", "-c", f"kill -CONT {daemon}", check=True)
    assert stuck.returncode != 0, stuck.stdout
    assert harness.podman("healthcheck", "run", first.name, check=False).returncode == 0


def test_tini_reaps_orphans_left_in_the_container(first):
    # The shell exits at once; its `sleep` is orphaned, adopted by PID 1, and must be reaped.
    first.exec("sh", "-c", "(sleep 0.5 &) ; exit 0", check=True)
    deadline = time.monotonic() + 30
    while True:
        states = first.exec("sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null").stdout
        sleeping = [line for line in states.splitlines() if "(sleep)" in line]
        if not sleeping:
            break
        assert time.monotonic() < deadline, f"never reaped: {sleeping}"
        time.sleep(0.2)


def test_stop_drains_the_request_in_flight_and_exits_0_within_the_budget(first, request):
    budget = stop_budget(load_settings(None, environ=_env()))
    answer: dict[str, object] = {}
    worker = threading.Thread(target=lambda: answer.update(zip(("status", "body"), _generate(
        first.url, steps=60))))  # 60 steps at 0.05 s: three seconds in ComfyUI
    worker.start()
    deadline = time.monotonic() + 30
    while _get(f"{first.url}/health")[1].get("queue", {}).get("in_flight", 0) < 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)
    processes = [psutil.Process(pid) for pid in first.host_pids()]
    assert len(processes) >= 4, processes  # tini, the daemon, ComfyUI, the wrapper
    seconds = first.stop(budget)
    worker.join(30)
    _report(request, f"podman stop with a request in flight: {seconds:.1f} s "
                     f"(stop budget {budget:.0f} s)")
    state = first.state()
    assert state["Status"] == "exited" and state["ExitCode"] == 0, (state, first.logs()[-3000:])
    assert seconds < budget
    assert answer.get("status") == 200, answer  # drained, not cut off
    logs = first.logs()
    assert "SIGKILL" not in logs.split("SIGTERM received")[-1], logs[-3000:]
    left = [p for p in processes if p.is_running()]  # is_running tells a reused pid apart
    assert not left, left


def test_a_second_start_takes_the_benchmark_from_the_state_volume(image, volumes, first,
                                                                  request):
    if first.state()["Status"] != "exited":
        first.stop(stop_budget(load_settings(None, environ=_env())))
    assert any((volumes["state"] / "benchmark").iterdir()), "no benchmark cache on the volume"
    second = harness.Container(image.tag, _env(), extra=harness.volume_args(volumes)).start()
    try:
        seconds = _wait_ready(second)
        _report(request, f"second start to ready (benchmark from the state volume): "
                         f"{seconds:.1f} s")
        report = json.loads(second.exec("comfy-worker", "health", "--json").stdout)
        assert report["benchmark"].get("from_cache") is True, report["benchmark"]
        assert "from cache" in second.logs()
    finally:
        second.remove()


def test_without_a_gpu_handed_in_run_and_gpu_name_the_flag(image):
    env = {**_env(), "GPU_REQUIRED": "true"}
    flags = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    checked = harness.podman("run", "--rm", *flags, image.tag, "gpu", "--seconds", "0.3",
                             check=False)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert "in a podman container without NVML" in checked.stdout, checked.stdout
    assert "--device nvidia.com/gpu=all" in checked.stdout and "--gpus all" in checked.stdout
    running = harness.Container(image.tag, env).start()
    try:
        deadline = time.monotonic() + 60
        while "GPU: in a podman container without NVML" not in running.logs():
            assert time.monotonic() < deadline, running.logs()[-3000:]
            time.sleep(0.2)
    finally:
        running.remove()


async def test_vast_template_reports_ready_and_serves_a_signed_request(image, tmp_path, request):
    from tests.support import vast_template  # the script docs/container.md shows; aiohttp-based

    outcome = await vast_template.check(image.tag, tmp_path, log=lambda line: _report(request,
                                                                                       line))
    ready = outcome.ready_report
    assert ready["id"] == 4242 and ready["mtoken"], ready
    assert ready["url"].startswith("https://127.0.0.1:"), ready  # USE_SSL with the instance cert
    assert outcome.signed_status == 200, outcome.signed_body
    assert outcome.signed_body["output"][0]["filename"].endswith(".png")
    assert outcome.unsigned_status == 401
    (done,) = [r for r in outcome.deleted["requests"] if r["request_idx"] == outcome.request_idx]
    assert done["success"] is True, outcome.deleted


async def test_an_update_request_exits_75_and_restart_on_failure_starts_it_again(image, tmp_path,
                                                                                request):
    from tests.support import vast_template  # aiohttp-based, as above

    restarted = await vast_template.check_update(image.tag, tmp_path, log=lambda line: _report(
        request, line))
    assert restarted.update_status == 200, restarted.logs[-3000:]
    # tini passed the daemon's 75 on; the runtime took it for a failure and started it again.
    assert restarted.exit_code == 75, restarted.logs[-3000:]
    assert restarted.restart_count == 1
    assert restarted.ready_again["url"].startswith("https://"), restarted.ready_again
    assert restarted.logs.count("POST /pyworker/update: draining") == 1


# A ComfyUI checkout for the with-comfyui target: its main.py hands its command line to the
# simulator, so the image's default comfyui.command (ComfyUI's own venv, main.py) runs it.
FAKE_COMFYUI = {
    "ComfyUI/main.py": "import os, sys\n"
                       "os.execv('/opt/comfy-worker/venv/bin/python',\n"
                       "         ['python', '-m', 'simulator', '--step-seconds', '0.05',"
                       " *sys.argv[1:]])\n",
    "ComfyUI/requirements.txt": "six\n",  # installed offline from the wheelhouse
}


def test_with_comfyui_target_runs_comfyui_from_the_checkout(image, request):
    build = harness.build_image(f"{image.tag}-with-comfyui", image.base,
                                target="with-comfyui", extra=FAKE_COMFYUI)
    _report(request, f"with-comfyui: {build.describe()}")
    six = harness.podman("run", "--rm", "--entrypoint", "/opt/ComfyUI/venv/bin/python",
                         build.tag, "-c", "import six; print(six.__file__)").stdout
    assert six.startswith("/opt/ComfyUI/venv/"), six
    # No COMFYUI_* settings: the built-in comfyui.command finds ComfyUI where the stage put it.
    container = harness.Container(build.tag, {"WORKER_AUTH_TOKEN": TOKEN,
                                              "GPU_REQUIRED": "false"}).start()
    try:
        _wait_ready(container)
        status, body = _generate(container.url, steps=4)
        assert status == 200, body
        assert body["output"][0]["local_path"].startswith("/opt/ComfyUI/output/"), body
    finally:
        container.remove()
        harness.podman("rmi", build.tag, check=False)
