"""Start real comfy-worker processes for tests: the API wrapper and the whole daemon."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("S3_", "WEBHOOK_", "REPORT_ADDR", "COMFY", "WORKER_", "API_",
                                "BENCHMARK_", "GPU_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class Proc:
    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


@contextlib.contextmanager
def start_wrapper(tmp_path: Path, comfy_url: str, output_dir: Path, *, port: int | None = None,
                  state_dir: Path | None = None, **env: str) -> Iterator[Proc]:
    port = port or free_port()
    state_dir = state_dir or tmp_path / "wrapper-state"
    log_path = tmp_path / f"wrapper-{port}.log"
    environment = base_env(COMFYUI_URL=comfy_url, COMFYUI_OUTPUT_DIR=str(output_dir),
                           WORKER_STATE_DIR=str(state_dir), API_PORT=str(port),
                           WEBHOOK_ALLOW_PRIVATE_TARGETS="true", API_ALLOW_PRIVATE_INPUTS="true",
                           **env)
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "api"], cwd=ROOT,
                                   env=environment, stdout=log, stderr=subprocess.STDOUT)
    proc = Proc(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_until(lambda: process.poll() is not None or http_status(proc.url + "/health"),
                   30, "the wrapper to answer")
        if process.poll() is not None:
            raise AssertionError(f"wrapper exited: {proc.log()}")
        yield proc
    finally:
        proc.stop()


def post_json(url: str, body, headers: dict[str, str] | None = None, timeout: float = 60
              ) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"{}")
        except ValueError:
            return exc.code, {"_raw": raw.decode(errors="replace")}


def get_json(url: str, timeout: float = 10) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
