"""Start a simulator process from tests.

    from simulator.testing import start_simulator

    @pytest.fixture
    def comfy(tmp_path):
        with start_simulator(tmp_path, "--step-seconds", "0.01") as sim:
            yield sim          # sim.url, sim.port, sim.process, sim.output_dir, ...

``start_simulator`` is a plain (sync) context manager, usable from sync and async fixtures;
``async_start_simulator`` wraps it for ``async with`` without blocking the event loop.
"""

from __future__ import annotations

import asyncio
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
from typing import Any, AsyncIterator, Iterator, Mapping

from simulator.api_version import ApiVersion, default_api_version
from simulator.errors import SimulatorError

_REPO_ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_SECONDS = 5.0


class SimulatorStartError(SimulatorError):
    """The simulator exited or did not answer ``/system_stats`` in time."""


@dataclass
class SimulatorHandle:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    base_dir: Path
    output_dir: Path
    input_dir: Path
    temp_dir: Path
    log_path: Path
    api_version: ApiVersion = ApiVersion.V0_3_64

    @property
    def ws_url(self) -> str:
        return "ws://" + self.url.split("://", 1)[1] + "/ws"

    def log_text(self) -> str:
        """Everything the simulator has logged so far."""
        return self.log_path.read_text(errors="replace")

    def set_knobs(self, **changes: Any) -> dict[str, Any]:
        """Change runtime knobs (``POST /__sim__/knobs``); returns the knobs now in force.

        Blocking (urllib): from async code prefer an aiohttp POST or ``asyncio.to_thread``.
        """
        request = urllib.request.Request(f"{self.url}/__sim__/knobs", data=json.dumps(changes).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())["knobs"]

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        return stop_process(self.process, grace)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_signals() -> None:
    """In the child before exec: the signals a test stops it with act as on a terminal, whatever the
    test run inherited (a shell's background job ignores SIGINT and SIGQUIT, and an ignored signal
    stays ignored across exec)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def stop_process(process: subprocess.Popen[bytes], grace: float = STOP_GRACE_SECONDS) -> int | None:
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    with contextlib.suppress(ProcessLookupError):
        # A process stopped by the sigstop hang mode only acts on SIGTERM once continued.
        process.send_signal(signal.SIGCONT)
    try:
        return process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=grace)


def _probe(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/system_stats", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _version_for(api_version: ApiVersion | str | None, args: tuple[str, ...], env: Mapping[str, str]) -> ApiVersion:
    """The version the child will speak: the argument, else an --api-version among ``args``,
    else the ``SIM_API_VERSION`` of the environment it is given."""
    if api_version is not None:
        return ApiVersion(api_version)
    for index, arg in enumerate(args):
        if arg == "--api-version" and index + 1 < len(args):
            return ApiVersion(args[index + 1])
        if arg.startswith("--api-version="):
            return ApiVersion(arg.split("=", 1)[1])
    return default_api_version(env)


def launch_simulator(tmp_path: os.PathLike[str] | str, *args: str, env: Mapping[str, str] | None = None,
                     port: int | None = None, api_version: ApiVersion | str | None = None) -> SimulatorHandle:
    """Start the process without waiting for it (for tests of start-up failures).

    ``api_version`` passes ``--api-version``; None leaves it to ``SIM_API_VERSION`` (0.3.64
    when unset), so a whole test run can switch.
    """
    base = Path(tmp_path) / "comfyui"
    base.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = Path(tmp_path) / f"simulator-{port}.log"
    child_env = dict(os.environ if env is None else env)
    version = _version_for(api_version, args, child_env)
    chosen = ["--api-version", version.value] if api_version is not None else []
    command = [sys.executable, "-m", "simulator", "--port", str(port), "--base-directory", str(base), *chosen,
               *args]
    # The package must import even when the test runs from another working directory.
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), child_env.get("PYTHONPATH", "")) if p)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=str(base),
                                   preexec_fn=_default_signals)
    return SimulatorHandle(url=f"http://127.0.0.1:{port}", port=port, process=process, base_dir=base,
                           output_dir=base / "output", input_dir=base / "input", temp_dir=base / "temp",
                           log_path=log_path, api_version=version)


def wait_ready(handle: SimulatorHandle, timeout: float) -> None:
    """Poll ``/system_stats`` until it answers 200; raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise SimulatorStartError(f"simulator exited with status {handle.process.returncode} before it was "
                                      f"ready; log:\n{handle.log_text()[-2000:]}")
        if _probe(handle.url, timeout=0.5):
            return
        time.sleep(0.05)
    raise SimulatorStartError(f"simulator did not answer {handle.url}/system_stats within {timeout:.0f} s; "
                              f"log:\n{handle.log_text()[-2000:]}")


@contextlib.contextmanager
def start_simulator(tmp_path: os.PathLike[str] | str, *args: str, env: Mapping[str, str] | None = None,
                    ready_timeout: float = 20.0, api_version: ApiVersion | str | None = None
                    ) -> Iterator[SimulatorHandle]:
    """Run ``python -m simulator`` on a free port with its folders under ``tmp_path``; yield
    once ``/system_stats`` answers; stop it (SIGTERM, then SIGKILL) on exit.

    ``args`` are extra command-line options (``"--step-seconds", "0.01"``...); ``api_version``
    as for ``launch_simulator``. A port taken between choosing and binding is retried with
    another port.
    """
    handle: SimulatorHandle | None = None
    for attempt in range(3):
        handle = launch_simulator(tmp_path, *args, env=env, api_version=api_version)
        try:
            wait_ready(handle, ready_timeout)
            break
        except SimulatorStartError:
            stop_process(handle.process)
            log = handle.log_text().lower()
            # 0.3.64 dies of the OSError; the newest ComfyUI says "Port N is already in use...".
            if attempt < 2 and ("address already in use" in log or "is already in use on address" in log):
                continue
            raise
    assert handle is not None
    try:
        yield handle
    finally:
        handle.stop()


@contextlib.asynccontextmanager
async def async_start_simulator(tmp_path: os.PathLike[str] | str, *args: str,
                                env: Mapping[str, str] | None = None,
                                ready_timeout: float = 20.0,
                                api_version: ApiVersion | str | None = None) -> AsyncIterator[SimulatorHandle]:
    """``start_simulator`` for ``async with``: starting and stopping run in a thread."""
    manager = start_simulator(tmp_path, *args, env=env, ready_timeout=ready_timeout, api_version=api_version)
    handle = await asyncio.to_thread(manager.__enter__)
    try:
        yield handle
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)
