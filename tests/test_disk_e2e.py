"""A full disk, for real: ComfyUI's input and output folders on a small tmpfs the test mounts,
the simulator writing 1 MB outputs, requests bringing 1 MB input images, and the real wrapper
(and daemon) in front.

What a user would notice: requests keep succeeding under retention while the folders stay the
same size; with retention off a full disk is a 507 that says what is full (never a 500); the
daemon's guard takes the worker out of service before ComfyUI fails and back in once space is
freed; a running, uploading or webhook-waiting request keeps its files whatever retention is
asked.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

from simulator.testing import start_simulator
from tests.support.net import wait_until
from tests.support.procs import ROOT, base_env, get_json, post_json, run, start_daemon, start_wrapper
from tests.support.slowlink import SlowLink
from tests.support.smallfs import small_filesystem, unique_bytes

pytestmark = pytest.mark.real_processes

MB = 1_000_000


def http_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.read().decode()


def run_health(worker):
    return run([sys.executable, "-m", "supervisor.commands.cli", "health"], cwd=ROOT,
               env=base_env(WORKER_ADMIN_SOCKET=str(worker.admin_socket)), capture_output=True,
               text=True, timeout=60)


def noise_png(approx_bytes: int) -> bytes:
    """A real PNG of random pixels: as large on disk as a photo of its size."""
    side = int((approx_bytes / 3) ** 0.5)
    raw = b"".join(b"\x00" + os.urandom(side * 3) for _ in range(side))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 0)) + chunk(b"IEND", b""))


IMAGE = "data:image/png;base64," + base64.b64encode(noise_png(MB)).decode()


def body(prefix: str, *, blur: bool = False, **extra) -> dict:
    """LoadImage (the 1 MB input) -> [ImageBlur: one step's time] -> SaveImage (1 MB output)."""
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": IMAGE}},
             "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                         "filename_prefix": prefix}}}
    if blur:
        graph["2"] = {"class_type": "ImageBlur",
                      "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0}}
        graph["9"]["inputs"]["images"] = ["2", 0]
    return {"input": {"workflow_json": graph, **extra}}


@pytest.fixture
def small_disk(tmp_path):
    with small_filesystem(tmp_path / "disk", 40) as disk:
        (disk / "input").mkdir()
        (disk / "output").mkdir()
        yield disk


def simulator(tmp_path: Path, disk: Path, *extra: str):
    return start_simulator(tmp_path, "--input-directory", str(disk / "input"),
                           "--output-directory", str(disk / "output"), "--image-bytes", str(MB),
                           "--step-seconds", "0.01", *extra)


def wrapper(tmp_path: Path, sim, disk: Path, **env):
    return start_wrapper(tmp_path, sim.url, disk / "output", COMFYUI_INPUT_DIR=str(disk / "input"),
                         COMFYUI_TEMP_DIR=str(tmp_path / "temp"), **env)


def test_requests_keep_succeeding_under_retention_and_the_folders_stay_the_same_size(
        tmp_path, small_disk):
    # 60 requests write 120 MB (a 1 MB input and a 1 MB output each) through a 40 MB disk.
    with simulator(tmp_path, small_disk) as sim, \
            wrapper(tmp_path, sim, small_disk, RETENTION_OUTPUTS_MAX_GB="0.008",
                    RETENTION_INTERVAL="0.2") as api:
        codes, after_pass = [], set()
        for n in range(60):
            status, result = post_json(api.url + "/generate/sync", body(f"r{n}"))
            codes.append(status)
            assert status == 200, result
            last = get_json(api.url + "/retention")[1]["last_pass"]
            after_pass.add((last["at"], last["output_folder"]["bytes"]))
        post_json(api.url + "/retention", {"free_bytes": 0})
        final = unique_bytes(small_disk / "output")
        inputs_left = len(list((small_disk / "input").iterdir()))
        _, health = get_json(api.url + "/health")
    assert codes == [200] * 60
    # Flat: every pass brought the folder back under its cap (8 MB), however many requests had
    # gone through; whatever a loaded machine made the passes lag, the disk never filled.
    assert len(after_pass) >= 5
    assert all(size <= 8 * MB for _, size in after_pass), sorted(after_pass)
    assert final <= 8 * MB and inputs_left == 0
    removed = health["retention"]["removed"]
    assert removed["outputs"]["bytes"] >= 40 * MB and removed["inputs"]["files"] >= 50


def test_with_retention_off_a_full_disk_is_a_507_that_says_what_is_full(tmp_path, small_disk):
    with simulator(tmp_path, small_disk) as sim, \
            wrapper(tmp_path, sim, small_disk, RETENTION_ENABLED="false") as api:
        answers = []
        for n in range(30):
            status, result = post_json(api.url + "/generate/sync", body(f"r{n}"))
            answers.append((status, result.get("message", "")))
            if status != 200:
                break
    status, message = answers[-1]
    assert 10 <= len(answers) < 30, answers
    assert status == 507, answers[-1]
    assert message.startswith("disk full: ") and str(small_disk) in message
    assert "% full" in message and "retention" in message
    assert all(code in (200, 507) for code, _ in answers)


def test_a_running_request_keeps_its_input_while_retention_is_asked_for_everything(tmp_path):
    disk = tmp_path / "folders"
    (disk / "input").mkdir(parents=True)
    (disk / "output").mkdir()
    with start_simulator(tmp_path, "--input-directory", str(disk / "input"),
                         "--output-directory", str(disk / "output"),
                         "--step-seconds", "2") as sim, \
            wrapper(tmp_path, sim, disk, RETENTION_PRESSURE_MIN_AGE="0",
                    RETENTION_OUTPUTS_MAX_GB="0.000001", RETENTION_INTERVAL="3600") as api:
        assert post_json(api.url + "/generate/sync", body("done"))[0] == 200
        done_files = sorted((disk / "output").iterdir())
        results = {}
        runner = threading.Thread(target=lambda: results.update(
            answer=post_json(api.url + "/generate/sync", body("busy", blur=True,
                                                               request_id="busy"))))
        runner.start()
        wait_until(lambda: (disk / "input" / "busy_1.png").exists(), 20, "the busy upload")
        status, report = post_json(api.url + "/retention", {"free_bytes": 10**12})
        assert status == 200
        assert report["requests"] == 1           # the finished one went
        assert (disk / "input" / "busy_1.png").exists()
        runner.join(30)
        assert results["answer"][0] == 200
        assert (disk / "output" / "busy").is_dir()
        post_json(api.url + "/retention", {"free_bytes": 0})
    assert done_files and not any(path.exists() for path in done_files)
    assert not (disk / "input" / "busy_1.png").exists()
    assert not (disk / "output" / "busy").exists()  # over the cap once it finished


class Receiver(http.server.BaseHTTPRequestHandler):
    """A webhook receiver that answers 503 until `accept` is set."""

    accept = threading.Event()
    delivered: list[str] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ok = self.accept.is_set()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()
        if ok:
            self.delivered.append(self.path)

    def log_message(self, *args):
        pass


def test_uploading_and_webhook_waiting_requests_keep_their_files(tmp_path, moto_server):
    disk = tmp_path / "folders"
    (disk / "input").mkdir(parents=True)
    (disk / "output").mkdir()
    moto_server.create_bucket("outputs")
    link = SlowLink(moto_server.port)
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    s3 = {"access_key_id": "k", "secret_access_key": "s", "bucket_name": "outputs",
          "endpoint_url": link.url, "region": "us-east-1"}
    try:
        with start_simulator(tmp_path, "--input-directory", str(disk / "input"),
                             "--output-directory", str(disk / "output"),
                             "--step-seconds", "0.01") as sim, \
                wrapper(tmp_path, sim, disk, RETENTION_OUTPUTS="uploaded",
                        RETENTION_PRESSURE_MIN_AGE="0", RETENTION_INTERVAL="3600",
                        WEBHOOK_BACKOFF_INITIAL="0.2", WEBHOOK_BACKOFF_MAX="0.5",
                        WEBHOOK_RETRIES="100") as api:
            # Uploading: the S3 link holds the upload; retention asked for everything.
            link.hold()
            results = {}
            runner = threading.Thread(target=lambda: results.update(answer=post_json(
                api.url + "/generate/sync", body("up", request_id="up", s3=s3))))
            runner.start()
            wait_until(link.held.is_set, 30, "the upload to reach the held link")
            post_json(api.url + "/retention", {"free_bytes": 10**12})
            assert any((disk / "output" / "up").iterdir())
            link.release()
            runner.join(60)
            assert results["answer"][0] == 200 and results["answer"][1]["output"][0].get("url")
            post_json(api.url + "/retention", {"free_bytes": 0})
            assert not (disk / "output" / "up").exists()  # in S3 now: it may go

            # Waiting for its webhook: the receiver answers 503 until it accepts.
            status, _ = post_json(api.url + "/generate/sync",
                                  body("hooked", request_id="hooked", webhook={"url": hook}))
            assert status == 200
            post_json(api.url + "/retention", {"free_bytes": 10**12})
            assert any((disk / "output" / "hooked").iterdir())
            Receiver.accept.set()
            wait_until(lambda: Receiver.delivered, 30, "the webhook to be delivered")
            wait_until(lambda: post_json(api.url + "/retention", {"free_bytes": 10**12})[1]
                       .get("requests"), 10, "the delivered request's files to go")
            assert not (disk / "output" / "hooked").exists()
    finally:
        link.close()
        receiver.shutdown()


# --- the daemon's disk guard ----------------------------------------------------------------------
def daemon_env(disk: Path, **extra) -> dict:
    """The simulator's input and output folders on `disk`, 1 MB outputs, the disk sampled every
    0.2 s; the guard judges by free bytes only (the percentages at 100)."""
    return {"COMFYUI_INPUT_DIR": str(disk / "input"), "COMFYUI_OUTPUT_DIR": str(disk / "output"),
            "GPU_SAMPLE_INTERVAL": "0.2", "DISK_WARNING_PERCENT": "100",
            "DISK_CRITICAL_PERCENT": "100", **{k: str(v) for k, v in extra.items()}}


def sim_args(disk: Path) -> tuple[str, ...]:
    return ("--input-directory", str(disk / "input"), "--output-directory", str(disk / "output"),
            "--image-bytes", str(MB), "--step-seconds", "0.01")


def test_the_guard_takes_the_worker_out_before_comfyui_fails_and_back_once_space_is_freed(
        tmp_path, small_disk):
    env = daemon_env(small_disk, RETENTION_ENABLED="false", DISK_WARNING_FREE_GB="0.012",
                     DISK_CRITICAL_FREE_GB="0.008")
    with start_daemon(tmp_path, *sim_args(small_disk), extra_env=env) as worker:
        answers = []
        for n in range(40):
            status, result = worker.generate(body(f"r{n}"))
            answers.append((status, result))
            if status != 200:
                break
            time.sleep(0.3)  # a sample between two requests: the guard is not racing them
        status, refused = answers[-1]
        # Out of service with the reason, while the disk still had room: ComfyUI never failed.
        assert status == 503, answers[-1]
        assert all(code == 200 for code, _ in answers[:-1])
        free = shutil.disk_usage(small_disk).free
        assert free > 4 * MB
        reason = refused["reason"]
        assert reason.startswith(f"disk {small_disk / 'output'} ") and "% full (" in reason
        assert "retention is off (retention.enabled = false)" in reason
        code, health = http_json(worker.url + "/health")
        assert code == 503 and health["state"] == "unhealthy"
        assert health["disk"]["level"] == "unhealthy" and "path" not in str(health["disk"])
        cli = run_health(worker)
        assert cli.returncode == 2 and "DISK  critical" in cli.stdout, cli.stdout
        assert 'comfy_worker_disk_level{' in fetch(worker.metrics_url + "/metrics")
        # Space returns: the operator deletes outputs; the worker takes work again by itself.
        for path in (small_disk / "output").rglob("*.png"):
            path.unlink()
        wait_until(lambda: http_json(worker.url + "/health")[0] == 200, 15,
                   "the worker to take work again")
        assert worker.generate(body("after"))[0] == 200


def test_with_retention_the_guards_warning_frees_space_and_the_worker_keeps_serving(
        tmp_path, small_disk):
    # No cap and long-lived results: only the guard's ask frees space here.
    env = daemon_env(small_disk, RETENTION_OUTPUTS_MAX_GB="0", RETENTION_INTERVAL="3600",
                     RETENTION_PRESSURE_MIN_AGE="0",
                     DISK_WARNING_FREE_GB="0.02", DISK_CRITICAL_FREE_GB="0.006")
    with start_daemon(tmp_path, *sim_args(small_disk), extra_env=env) as worker:
        for n in range(50):  # 100 MB through a 40 MB disk
            status, result = worker.generate(body(f"r{n}"))
            assert status == 200, (n, result)
            time.sleep(0.1)
        history = worker.status()["worker"]["history"]
        _, wrapper = get_json(worker.wrapper_url + "/retention")
    assert not any(h["state"] == "unhealthy" for h in history), history
    # 100 MB were written; what is on the disk at the end is less than 34 MB (never critical).
    removed = wrapper["removed"]
    assert removed["outputs"]["bytes"] + removed["inputs"]["bytes"] >= 66 * MB, removed
    log = (tmp_path / "logs" / "wrapper.log").read_text()
    assert "the disk guard asked for space" in log


def test_with_comfyuis_assets_on_retention_bounds_the_folder_not_the_database(tmp_path):
    # The newest ComfyUI's assets: every output gets a row, a deleted file's row is kept as
    # missing. What docs/disk.md says, shown on the simulator's model of it.
    disk = tmp_path / "folders"
    (disk / "input").mkdir(parents=True)
    (disk / "output").mkdir()
    with start_simulator(tmp_path, "--input-directory", str(disk / "input"),
                         "--output-directory", str(disk / "output"), "--image-bytes", str(MB),
                         "--step-seconds", "0.01", "--assets-gc-seconds", "0.2",
                         api_version="0.38.1") as sim, \
            wrapper(tmp_path, sim, disk, RETENTION_OUTPUTS_MAX_GB="0.003",
                    RETENTION_INTERVAL="3600") as api:
        for n in range(12):
            assert post_json(api.url + "/generate/sync", body(f"a{n}"))[0] == 200
            post_json(api.url + "/retention", {"free_bytes": 0})
        time.sleep(0.5)  # the simulator's walk after prompts
        _, assets = get_json(sim.url + "/__sim__/assets")
    assert unique_bytes(disk / "output") <= 3 * MB
    assert assets["enabled"] and assets["rows"] >= 12 and assets["missing"] >= 9, assets
