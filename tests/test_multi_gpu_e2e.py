"""End to end: one worker, four fake GPUs, four instances (a simulator and a wrapper each).

The daemon reads four identical H100s from a fake NVML file and runs one instance per GPU from a
templated comfyui.command (`{port}`, `{instance_folders}`). What a user would notice is checked at
the public port: N requests run at once on N instances, a hot GPU or a killed ComfyUI takes out
only its own instance, and a GPU slower than its identical siblings is refused.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
import urllib.request

import pytest
from click.testing import CliRunner

from supervisor.commands.health_cli import health
from tests.support.bench import NOT_JUDGED
from tests.support.comfy_modes import NEWEST
from tests.support.fake_autoscaler import ThreadedAutoscaler, autoscaler_env
from tests.support.procs import (
    ROOT,
    fake_gpus,
    free_port,
    get_json,
    start_multi,
    wait_until,
)
from tests.support.timing import allowance
from tests.support.workflows import sampler_graph

pytestmark = pytest.mark.e2e

GPUS = 4
SIMULATED_GPU = "NVIDIA Simulated GPU"  # a model no reference table knows
STEP_SECONDS = 0.1


def text2image(steps: int, name: str = "") -> dict:
    body = {"modifier": "Text2Image",
            "modifications": {"steps": steps, "width": 64, "height": 64}}
    if name:
        body["request_id"] = name
    return {"input": body}


def bench_env(**extra: str) -> dict[str, str]:
    return {"BENCHMARK_ENABLED": "true", "BENCHMARK_TEST_WIDTH": "64",
            "BENCHMARK_TEST_HEIGHT": "64", "BENCHMARK_TEST_STEPS": "10", "BENCHMARK_RUNS": "1",
            **extra}


def ready_instances(worker, want: int = GPUS):
    status, body = get_json(worker.url + "/health")
    instances = body.get("instances") or []
    if status == 200 and sum(i["state"] == "ready" for i in instances) == want:
        return body
    return None


def concurrently(worker, bodies: list[dict], timeout: float = 120) -> list[tuple]:
    answers: list = [None] * len(bodies)

    def call(index: int) -> None:
        started = time.monotonic()
        status, body = worker.generate(bodies[index], timeout=timeout)
        answers[index] = (status, body, time.monotonic() - started, time.monotonic())

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return answers


@pytest.mark.slow
def test_four_gpus_four_instances_run_requests_side_by_side_and_a_crash_stays_local(tmp_path,
                                                                                   comfy_api):
    # A GPU model no reference table knows and no figure of our own: the identical siblings,
    # benchmarked side by side, judge each other (a fixed figure cannot know how busy the shared
    # machine is). Assets on: the newest ComfyUI then locks each instance's database, and a
    # shared one would stop the second.
    with start_multi(tmp_path, GPUS, "--step-seconds", str(STEP_SECONDS), wait_ready=False,
                     gpu_name=SIMULATED_GPU,
                     extra_env=bench_env(**NOT_JUDGED, COMFYUI_ASSETS="on")) as worker:
        body = wait_until(lambda: ready_instances(worker), 180, "four ready instances")
        assert body["state"] == "ready", body
        status = worker.status()
        instances = status["instances"]
        assert [i["gpu"]["index"] for i in instances] == [0, 1, 2, 3]
        # Each instance: its own ports, its GPU pinned by UUID, its own benchmark verdict.
        ports = {i["comfyui_url"] for i in instances} | {i["wrapper_url"] for i in instances}
        assert len(ports) == 2 * GPUS
        for i in instances:
            assert i["gpu"]["pinned"] and i["gpu"]["uuid"].startswith("GPU-")
            assert i["benchmark"]["status"] not in ("pending", "error", "slow"), i["benchmark"]
            assert i["benchmark"]["its"] > 0
        # ... and its own output folder, models shared.
        outputs = {str(tmp_path / "comfy" / "instances" / str(n) / "output") for n in range(GPUS)}
        assert all(os.path.isdir(path) for path in outputs)
        # ... and its own database, locked by its ComfyUI alone (the newest ComfyUI's lock).
        databases = [tmp_path / "comfy" / "instances" / str(n) / "user" / "comfyui.db"
                     for n in range(GPUS)]
        assert [str(i["assets"]["database"]) for i in instances] == [str(d) for d in databases]
        if comfy_api == NEWEST:
            assert all(i["assets"]["mode"] == "on" for i in instances)
            assert all(d.with_name("comfyui.db.lock").exists() for d in databases)
        assert status["max_perf"] > 3 * instances[0]["benchmark"]["max_perf"]

        # 8 requests of ~1 s each: two rounds of four (a quarter of one after another), not
        # eight one after another or four rounds of two (half).
        began = time.monotonic()
        answers = concurrently(worker, [text2image(10) for _ in range(8)])
        elapsed = time.monotonic() - began
        assert all(a[0] == 200 for a in answers), [a[:2] for a in answers]
        served = [a[1]["served_by"]["instance"] for a in answers]
        assert sorted(served) == [0, 0, 1, 1, 2, 2, 3, 3], served
        assert all(a[1]["served_by"]["gpu_uuid"].startswith("GPU-") for a in answers)
        # Against one after another, measured in this run: the sum of their generation times.
        one_by_one = sum(a[1]["timings"]["generation_ms"] for a in answers) / 1000
        assert elapsed < 0.4 * one_by_one, \
            f"8 requests on 4 instances took {elapsed:.1f} s, one after another {one_by_one:.1f} s"

        # kill -9 one instance's ComfyUI mid-request, two requests on each instance: the one it
        # runs fails at once, the one queued behind it moves on, every other completes.
        victim = 1
        pid = worker.status()["instances"][victim]["children"]["comfyui"]["pid"]
        count = 2 * GPUS
        results: list = [None] * count

        def call(index: int) -> None:
            status, body = worker.generate(text2image(30, f"r{index}"), timeout=120)
            results[index] = (status, body, time.monotonic())

        threads = [threading.Thread(target=call, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        wait_until(lambda: worker.status()["queue"]["in_flight"] == count, 20,
                   "two requests handed to each instance")
        comfy_url = worker.status()["instances"][victim]["comfyui_url"]
        wait_until(lambda: (get_json(comfy_url + "/queue")[1].get("queue_running") or None),
                   20, "a prompt running on instance 1")
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        for thread in threads:
            thread.join(120)
        failed = [r for r in results if r[0] == 502]
        assert len(failed) == 1, [(r[0], r[1].get("error")) for r in results]
        assert "instance 1" in failed[0][1]["error"] and "SIGKILL" in failed[0][1]["error"]
        assert failed[0][2] - killed_at < allowance(1.0), "the 502 came late"
        assert [r[0] for r in results].count(200) == count - 1, [r[:2] for r in results]
        assert "request moved off instance 1" in worker.log()
        # Only instance 1 restarted; the worker is back to ready with it.
        wait_until(lambda: ready_instances(worker), 60, "instance 1 back")
        restarts = [i["children"]["comfyui"]["restarts"] for i in worker.status()["instances"]]
        assert restarts == [0, 1, 0, 0], restarts


def test_hot_gpu_takes_out_only_its_instance_and_comes_back(tmp_path):
    with start_multi(tmp_path, GPUS, "--step-seconds", "0.02") as worker:
        wait_until(lambda: ready_instances(worker), 120, "four ready instances")
        fake_gpus(tmp_path / "gpus.json", GPUS, None,
                  **{"2": {"temperature_c": 91, "clock_event_reasons": ["hw_thermal_slowdown"]}})
        status, body = wait_until(
            lambda: (lambda a: a if a[1].get("state") == "degraded" else None)(
                get_json(worker.url + "/health")), 20, "the worker degraded")
        assert status == 200
        assert "GPU 2" in body["reason"] and "thermal" in body["reason"].lower(), body["reason"]
        states = [i["state"] for i in body["instances"]]
        assert states == ["ready", "ready", "unhealthy", "ready"], states
        # The operator's view: a row per instance, exit 1 (some instances out).
        report = CliRunner().invoke(health, ["--socket", str(worker.admin_socket)])
        assert report.exit_code == 1, report.output
        assert "INSTANCES  3 of 4 serving" in report.output
        table = report.output.split("INSTANCES", 1)[1].splitlines()
        row = next(line for line in table if line.startswith("  2 "))
        assert "91°C" in row and "unhealthy" in row, row
        logs = CliRunner().invoke(health, ["--socket", str(worker.admin_socket), "--logs"])
        assert "instance 3 ComfyUI log, last" in logs.output, logs.output
        # /metrics: per-instance series, labelled with the instance and its GPU.
        text = urllib.request.urlopen(worker.metrics_url + "/metrics", timeout=5).read().decode()
        assert re.search(r'^comfy_worker_instance_serving\{comfy_instance="2",gpu="2"\} 0.0$',
                         text, re.M), text
        assert re.search(r'^comfy_worker_instance_serving\{comfy_instance="1",gpu="1"\} 1.0$',
                         text, re.M)
        assert 'comfy_worker_child_ready{child="comfyui",comfy_instance="3",gpu="3"} 1.0' in text
        # ... and every wrapper's own figures, merged under one family each.
        assert "comfy_worker_wrapper_metrics_up 1.0" in text
        for n in range(GPUS):
            assert re.search(r'^comfy_worker_wrapper_queue_depth\{comfy_instance="%d",gpu="%d"\} '
                             % (n, n), text, re.M), text
        assert text.count("# TYPE comfy_worker_wrapper_queue_depth ") == 1
        answers = concurrently(worker, [text2image(20) for _ in range(6)])
        assert all(a[0] == 200 for a in answers), [a[:2] for a in answers]
        assert 2 not in {a[1]["served_by"]["instance"] for a in answers}
        fake_gpus(tmp_path / "gpus.json", GPUS)
        body = wait_until(lambda: ready_instances(worker), 20, "GPU 2 back in")
        assert body["state"] == "ready"
        report = CliRunner().invoke(health, ["--socket", str(worker.admin_socket)])
        assert report.exit_code == 0 and "4 of 4 serving" in report.output, report.output
        answers = concurrently(worker, [text2image(20) for _ in range(8)])
        assert {a[1]["served_by"]["instance"] for a in answers} == {0, 1, 2, 3}
        # The operator drains one instance, then resumes it.
        from supervisor.commands.cli import main

        socket = ["--socket", str(worker.admin_socket)]
        drained = CliRunner().invoke(main, ["drain", "--instance", "0", *socket])
        assert drained.exit_code == 0 and "instance 0" in drained.output, drained.output
        status, body = get_json(worker.url + "/health")
        assert body["state"] == "degraded" and body["instances"][0]["state"] == "unhealthy"
        assert "draining" in body["instances"][0]["reason"]
        answers = concurrently(worker, [text2image(20) for _ in range(6)])
        assert 0 not in {a[1]["served_by"]["instance"] for a in answers}
        wrong = CliRunner().invoke(main, ["resume", "--instance", "9", *socket])
        assert wrong.exit_code == 1 and "runs instances 0 to 3" in wrong.output
        assert CliRunner().invoke(main, ["resume", *socket]).exit_code == 0
        assert wait_until(lambda: ready_instances(worker), 10, "all serving again")
        # An XID error on GPU 3 takes out instance 3 alone.
        fake = tmp_path / "gpus.json"
        described = json.loads(fake.read_text())
        described["events"] = [{"gpu": 3, "xid": 79}]
        fake.write_text(json.dumps(described))
        status, body = wait_until(
            lambda: (lambda a: a if a[1].get("state") == "degraded" else None)(
                get_json(worker.url + "/health")), 20, "the worker degraded by the XID")
        assert [i["state"] for i in body["instances"]] == ["ready"] * 3 + ["unhealthy"]
        assert "XID 79" in body["instances"][3]["reason"], body["instances"][3]
        # The other three overheat too: nothing serves, the host reads 2.
        hot = {"temperature_c": 91, "clock_event_reasons": ["hw_thermal_slowdown"]}
        described["gpus"] = [{"preset": "h100_sxm", **hot} for _ in range(GPUS)]
        fake.write_text(json.dumps(described))
        status, body = wait_until(
            lambda: (lambda a: a if a[1].get("state") == "unhealthy" else None)(
                get_json(worker.url + "/health")), 20, "the worker unhealthy")
        assert status == 503 and body["reason"].startswith("no instance serves"), body["reason"]
        assert worker.generate(text2image(2))[0] == 503
        report = CliRunner().invoke(health, ["--socket", str(worker.admin_socket)])
        assert report.exit_code == 2 and "0 of 4 serving" in report.output, report.output


@pytest.mark.slow
def test_gpu_slower_than_its_identical_siblings_is_refused(tmp_path):
    # A GPU model no reference table knows: only the siblings can tell that GPU 2 is slow.
    # One at a time (benchmark.sequential): four simulators sharing two busy cores would
    # otherwise blur a 30% difference.
    with start_multi(tmp_path, GPUS, "--step-seconds", "0.2", wait_ready=False,
                     gpu_name=SIMULATED_GPU,
                     extra_env={**bench_env(BENCHMARK_SEQUENTIAL="true"),
                                "SIM_SLOW": "2=1.3"}) as worker:
        def settled():
            status, body = get_json(worker.url + "/health")
            instances = body.get("instances") or []
            if len(instances) == GPUS and all(i["benchmark"]["status"] not in ("pending", None)
                                              for i in instances) and \
                    body.get("state") == "degraded":
                return body
            return None

        body = wait_until(settled, 180, "every benchmark verdict")
        # One after another: no two measured runs overlapped.
        runs = sorted((i["benchmark"]["timestamp"] - i["benchmark"]["duration_s"],
                       i["benchmark"]["timestamp"]) for i in worker.status()["instances"])
        assert all(a[1] <= b[0] + 0.05 for a, b in zip(runs, runs[1:])), runs
        slow = body["instances"][2]
        assert slow["state"] == "unhealthy" and slow["benchmark"]["status"] == "slow", slow
        assert "slower than the median of its 3 sibling GPUs" in body["reason"], body["reason"]
        assert "instance 2" in body["reason"]
        for i in (0, 1, 3):
            assert body["instances"][i]["state"] == "ready", body["instances"][i]
        answers = concurrently(worker, [text2image(5) for _ in range(6)])
        assert all(a[0] == 200 for a in answers)
        assert 2 not in {a[1]["served_by"]["instance"] for a in answers}
        # `comfy-worker benchmark` measures every instance again; exit 1: one is slow.
        from supervisor.commands.cli import main

        result = CliRunner().invoke(main, ["benchmark", "--json", "--socket",
                                           str(worker.admin_socket)])
        assert result.exit_code == 1, result.output
        reports = json.loads(result.output)["instances"]
        assert [r["status"] for r in reports] == ["no_reference", "no_reference", "slow",
                                                  "no_reference"], reports
        assert reports[2]["siblings"]["ratio"] > 1.2 and reports[2]["from_cache"] is False


def test_the_aidock_wrapper_serves_as_each_instances_wrapper(tmp_path):
    """Someone else's wrapper (the ai-dock stand-in), templated: its port, its ComfyUI, and an
    install path whose output/ is its own ComfyUI's ({instance_folders} puts that at
    <base>/instances/<i>/output)."""
    base = tmp_path / "comfy"
    env = {"WRAPPER_COMMAND": json.dumps([sys.executable, "-m", "tests.support.aidock_standin",
                                          "--port", "{port}"]),
           "WRAPPER_CWD": str(ROOT),
           "WRAPPER_ENV": json.dumps({"COMFYUI_API_BASE": "{comfyui_url}",
                                      "COMFYUI_INSTALL_PATH": f"{base}/instances/{{instance}}"})}
    with start_multi(tmp_path, 2, "--step-seconds", "0.1", extra_env=env) as worker:
        wait_until(lambda: ready_instances(worker, 2), 120, "two ready instances")
        graph = sampler_graph(10)
        answers = concurrently(worker, [{"input": {"workflow_json": graph}} for _ in range(2)])
        assert [a[0] for a in answers] == [200, 200], [a[:2] for a in answers]
        assert sorted(a[1]["served_by"]["instance"] for a in answers) == [0, 1]
        for status, body, _, _ in answers:
            path = body["output"][0]["local_path"]
            assert f"/instances/{body['served_by']['instance']}/output/" in path, path
            assert open(path, "rb").read(4) == b"\x89PNG"


def test_the_autoscaler_sees_one_worker_with_the_sum_of_the_instances_max_perf(tmp_path):
    scaler = ThreadedAutoscaler()
    try:
        fake = scaler.new()
        port = free_port()
        env = {**autoscaler_env(fake.url, port), "WORKER_AUTH_TOKEN": None,
               **bench_env(**NOT_JUDGED)}  # the siblings judge each other, as above
        with start_multi(tmp_path, GPUS, "--step-seconds", str(STEP_SECONDS), port=port,
                         wait_ready=False, gpu_name=SIMULATED_GPU, extra_env=env) as worker:
            wait_until(lambda: ready_instances(worker), 180, "four ready instances")
            each = [i["benchmark"]["max_perf"] for i in worker.status()["instances"]]
            assert all(1 / allowance(2.0) < figure < 1.5 for figure in each), each  # 1/seconds
            def reporting(figure: float):
                # In the workload unit: requests per second x 100 (autoscaler.workload).
                last = fake.statuses[-1] if fake.statuses else {}
                return last if abs(last.get("max_perf", -1) - 100 * figure) < 1e-4 else None

            report = wait_until(lambda: reporting(sum(each)), 20, "max_perf of four instances")
            assert report["error_msg"] == ""
            # One instance out: its share leaves max_perf; the worker still serves.
            fake_gpus(tmp_path / "gpus.json", GPUS, SIMULATED_GPU, **{"0": {
                "temperature_c": 91, "clock_event_reasons": ["hw_thermal_slowdown"]}})
            report = wait_until(lambda: reporting(sum(each[1:])), 20, "max_perf without 0")
            assert report["error_msg"] == ""
    finally:
        scaler.close()
