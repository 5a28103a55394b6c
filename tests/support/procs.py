"""Start real processes for tests: any command (`popen`, `run`), the API wrapper and the whole
daemon (`start_wrapper`, `start_daemon`, `start_worker`, `start_multi`).

Every child starts with default signal dispositions and an empty signal mask, whatever the test
runner inherited: a shell's background job has SIGINT and SIGQUIT ignored, `nohup` ignores SIGHUP,
and an ignored signal stays ignored across fork and exec, so a test that stops a child with
Ctrl-C's signal would wait in vain.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from tests.support.net import free_port, free_port_run, http_status, wait_until  # noqa: F401  (shared)

ROOT = Path(__file__).resolve().parents[2]
#: The signals a test (or a user) sends to stop something; a child must not inherit them ignored.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP)


def default_signals() -> None:
    """`preexec_fn` for test children: default dispositions for STOP_SIGNALS, nothing blocked.
    (In the forked child, before exec; it only makes two system calls, so the threads of the test
    run cannot deadlock it.)"""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def popen(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen with default signal dispositions in the child."""
    return subprocess.Popen(argv, preexec_fn=default_signals, **kwargs)


def run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run with default signal dispositions in the child."""
    return subprocess.run(argv, preexec_fn=default_signals, **kwargs)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("S3_", "WEBHOOK_", "REPORT_ADDR", "COMFY", "WORKER_", "API_",
                                "BENCHMARK_", "GPU_", "NOTIFY_SOCKET", "WATCHDOG_",
                                "SUPERVISOR_", "LOG_LEVEL", "AUTOSCALER_", "UNSECURED",
                                "USE_SSL", "CONTAINER_ID", "MASTER_TOKEN", "PUBLIC_IPADDR",
                                "VAST_TCP_PORT_", "METRICS_"))}
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
        process = popen([sys.executable, "-m", "supervisor.commands.cli", "api"], cwd=ROOT,
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
    except (urllib.error.URLError, OSError):
        return None, {}


@dataclass
class Daemon(Proc):
    admin_socket: Path
    comfy_url: str
    state_dir: Path
    token: str
    wrapper_url: str = ""
    port: int = 0
    metrics_url: str = ""

    def status(self) -> dict:
        import asyncio

        from supervisor.reporting.admin import admin_request

        return asyncio.run(admin_request(self.admin_socket, "GET", "/status"))

    def child_pid(self, name: str) -> int | None:
        return self.status()["children"][name]["pid"]

    def generate(self, body, timeout: float = 60, headers: dict | None = None):
        auth = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return post_json(self.url + "/generate/sync", body, {**auth, **(headers or {})}, timeout)


def simulator_command(port: int, base: Path, *extra: str) -> str:
    return json.dumps([sys.executable, "-m", "simulator", "--listen", "127.0.0.1", "--port",
                       str(port), "--base-directory", str(base), *extra])


@contextlib.contextmanager
def start_daemon(tmp_path: Path, *sim_args: str, wait_ready: bool = True, token: str = "t0ken",
                 extra_env: dict | None = None, stop: bool = True,
                 port: int | None = None, comfy_port: int | None = None,
                 wrapper_port: int | None = None, launcher: Sequence[str] = ()) -> Iterator[Daemon]:
    """The whole worker as a subprocess (`comfy-worker run`) with the simulator as ComfyUI.

    `extra_env` overrides the test defaults; a value of None removes the variable. `launcher`
    is a command the daemon is started through (it must exec its arguments)."""
    comfy_port, wrapper_port = comfy_port or free_port(), wrapper_port or free_port()
    metrics_port = free_port()
    public_port = port or free_port()
    base = tmp_path / "comfy"
    state = tmp_path / "state"
    env = base_env(
        COMFYUI_COMMAND=simulator_command(comfy_port, base, *sim_args),
        COMFYUI_CWD=str(tmp_path), COMFYUI_URL=f"http://127.0.0.1:{comfy_port}",
        COMFYUI_OUTPUT_DIR=str(base / "output"), WRAPPER_URL=f"http://127.0.0.1:{wrapper_port}",
        WORKER_HOST="127.0.0.1", WORKER_PORT=str(public_port), WORKER_STATE_DIR=str(state),
        METRICS_HOST="127.0.0.1", METRICS_PORT=str(metrics_port),
        WORKER_LOG_DIR=str(tmp_path / "logs"), WORKER_ADMIN_SOCKET=str(tmp_path / "admin.sock"),
        GPU_REQUIRED="false", BENCHMARK_ENABLED="false", SUPERVISOR_PROBE_INTERVAL="0.5",
        SUPERVISOR_PROBE_TIMEOUT="1", SUPERVISOR_HANG_TIMEOUT="3",
        SUPERVISOR_BACKOFF_INITIAL="0.2", SUPERVISOR_BACKOFF_MAX="1",
        SUPERVISOR_CHILD_STOP_TIMEOUT="3", WORKER_DRAIN_TIMEOUT="3",
        **({"WORKER_AUTH_TOKEN": token} if token else {"UNSECURED": "true"}))
    for name, value in (extra_env or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    log_path = tmp_path / "daemon.log"
    with open(log_path, "ab") as log:
        process = popen([*launcher, sys.executable, "-m", "supervisor.commands.cli", "run"], cwd=ROOT,
                        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    daemon = Daemon(process, f"http://127.0.0.1:{public_port}", log_path,
                    tmp_path / "admin.sock", f"http://127.0.0.1:{comfy_port}", state,
                    env.get("WORKER_AUTH_TOKEN", ""), wrapper_url=f"http://127.0.0.1:{wrapper_port}",
                    port=public_port,
                    metrics_url=f"http://{env.get('METRICS_HOST', '127.0.0.1')}:{env.get('METRICS_PORT')}")
    try:
        if wait_ready:
            wait_until(lambda: process.poll() is not None or
                       http_status(daemon.url + "/health") == 200, 60, "the worker to be ready")
            if process.poll() is not None:
                raise AssertionError(f"daemon exited: {daemon.log()}")
        yield daemon
    finally:
        if stop:
            daemon.stop(30)


@contextlib.contextmanager
def start_worker(tmp_path: Path, *sim_args: str, env: dict[str, Any] | None = None,
                 port: int | None = None, wait_ready: bool = True) -> Iterator[Daemon]:
    """`start_daemon` with no authentication variable set by default: pass
    WORKER_AUTH_TOKEN, UNSECURED or the autoscaler's variables in `env` (None removes one)."""
    no_auth = {"WORKER_AUTH_TOKEN": None, "UNSECURED": None}
    with start_daemon(tmp_path, *sim_args, port=port, wait_ready=wait_ready,
                      extra_env={**no_auth, **(env or {})}) as worker:
        yield worker


def fake_gpus(path: Path, count: int, name: str | None = None, **overrides: dict) -> Path:
    """A GPU_FAKE_SOURCE file with `count` identical H100s (named `name` if given); `overrides`
    maps "2" to the fields that GPU 2 reports instead (hot, throttled, ...)."""
    named = {"name": name} if name else {}
    gpus = [{"preset": "h100_sxm", **named, **overrides.get(str(i), {})} for i in range(count)]
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps({"gpus": gpus}))
    os.replace(scratch, path)
    return path


@contextlib.contextmanager
def start_multi(tmp_path: Path, gpus: int, *sim_args: str, extra_env: dict | None = None,
                gpu_name: str | None = None, **kwargs) -> Iterator[Daemon]:
    """The whole worker on `gpus` fake GPUs: one simulator and one wrapper per GPU, from a
    templated comfyui.command (ports from comfyui.url/wrapper.url + instance, own folders)."""

    comfy_port, wrapper_port = free_port_run(gpus), free_port_run(gpus)
    base = tmp_path / "comfy"
    command = [sys.executable, str(ROOT / "tests" / "support" / "sim_instance.py"), "{instance}", "--listen",
               "127.0.0.1", "--port", "{port}", "--base-directory", str(base),
               "{instance_folders}", "--device-type", "cuda", *sim_args]
    env = {"COMFYUI_COMMAND": json.dumps(command), "COMFYUI_OUTPUT_DIR": None,
           "GPU_FAKE_SOURCE": str(fake_gpus(tmp_path / "gpus.json", gpus, gpu_name)),
           "GPU_REQUIRED": "true", "GPU_SAMPLE_INTERVAL": "0.2", **(extra_env or {})}
    with start_daemon(tmp_path, comfy_port=comfy_port, wrapper_port=wrapper_port,
                      extra_env=env, **kwargs) as daemon:
        yield daemon
