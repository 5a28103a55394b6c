"""What the perf scripts share: starting and stopping processes, the tiny workflow, statistics,
ComfyUI's own timestamps, memory figures and printing.

The scripts run from a fresh clone (``python -m tests.perf.NAME``); they share the port and
waiting helpers of ``tests.support.net`` with the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import (
    Any,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
    TypeVar,
)

import aiohttp

from tests.support import procs
from tests.support.net import (  # noqa: F401
    PerfError,
    free_port,
    free_port_run,
    http_status,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_GRACE = 10.0
T = TypeVar("T")

# Settings that a developer's shell may export and that would change what is measured.
_OUR_ENV_PREFIXES = ("S3_", "WEBHOOK_", "REPORT_ADDR", "COMFY", "WORKER_", "API_", "BENCHMARK_",
                     "GPU_", "SUPERVISOR_", "NOTIFY_SOCKET", "WATCHDOG_", "UNSECURED")


# --- processes ------------------------------------------------------------------------------------
def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without comfy-worker settings, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OUR_ENV_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update({k: str(v) for k, v in settings.items()})
    return env


@dataclass
class Service:
    """A process we started, its URL and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = STOP_GRACE) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)


def launch(name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path, url: str,
           *, new_session: bool = False) -> Service:
    with open(log_path, "ab") as log:
        process = procs.popen(list(argv), cwd=REPO_ROOT, env=dict(env), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=new_session)
    return Service(name, process, url, log_path)


@contextlib.contextmanager
def serving(service: Service, ready: Callable[[], bool], timeout: float,
            grace: float = STOP_GRACE) -> Iterator[Service]:
    """Wait until ``ready()``; yield; always stop the process."""
    try:
        wait_until(lambda: service.process.poll() is not None or ready(), timeout,
                   f"{service.name} to be ready")
        if service.process.poll() is not None:
            raise PerfError(f"{service.name} exited with status {service.process.returncode}; "
                            f"log tail:\n{service.log_tail()}")
        yield service
    finally:
        service.stop(grace)


def wrapper_env(comfy_url: str, output_dir: Path, state_dir: Path, port: int) -> dict[str, str]:
    """`comfy-worker api` pointed at a ComfyUI, with product defaults for everything else."""
    return clean_env(COMFYUI_URL=comfy_url, COMFYUI_OUTPUT_DIR=str(output_dir),
                     WORKER_STATE_DIR=str(state_dir), API_PORT=str(port), API_HOST="127.0.0.1")


@contextlib.contextmanager
def start_wrapper(workdir: Path, comfy_url: str, output_dir: Path,
                  timeout: float = 30.0) -> Iterator[Service]:
    port = free_port()
    env = wrapper_env(comfy_url, output_dir, workdir / "wrapper-state", port)
    service = launch("the wrapper", [sys.executable, "-m", "supervisor.commands.cli", "api"], env,
                     workdir / "wrapper.log", f"http://127.0.0.1:{port}")
    with serving(service, lambda: http_status(service.url + "/health") == 200, timeout) as started:
        yield started


@contextlib.contextmanager
def start_floor(workdir: Path, name: str, module: str, *args: str) -> Iterator[Service]:
    """One of the bare aiohttp hops (`tests.perf.bare_proxy`, `tests.perf.bare_forward`) that
    measure the floor of a Python HTTP hop on this machine, on a free port."""
    port = free_port()
    service = launch(name, [sys.executable, "-m", module, *args, "--port", str(port)],
                     clean_env(), workdir / f"{module.rsplit('.', 1)[-1]}.log",
                     f"http://127.0.0.1:{port}")
    with serving(service, lambda: http_status(service.url + "/health") == 200, 30) as started:
        yield started


def install_stop_signals() -> None:
    """SIGTERM/SIGHUP end the script through its ``finally`` blocks, so no child is left behind."""
    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def run_bounded(coro: Awaitable[T], seconds: float) -> T:
    """``asyncio.run`` with an overall limit (TimeoutError past it)."""
    async def bounded() -> T:
        task = asyncio.ensure_future(coro)
        await asyncio.wait({task}, timeout=seconds)
        if task.done():
            return task.result()
        # Python 3.11's asyncio.wait_for (the ComfyUI client uses it) can swallow a cancel that
        # arrives just as its inner call finishes, so one cancel is not enough: keep asking.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved
        raise TimeoutError(f"gave up after {seconds:g} s")

    return asyncio.run(bounded())


# --- the workload ---------------------------------------------------------------------------------
def tiny_graph(index: int, prefix: str = "perf") -> dict[str, Any]:
    """EmptyImage 64x64 -> SaveImage, a different colour for each ``index``.

    ComfyUI (and the simulator) reuse the outputs of a graph identical to the last one and would
    then measure the cache instead of a run. Multiplying by an odd constant modulo 2**24 is a
    bijection, so indices below 2**24 never repeat a colour.
    """
    color = (index * 2654435761) % 0x1000000
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                        "filename_prefix": prefix}}}


class Counter:
    """Hands out indices for ``tiny_graph`` so that no two requests of a run share a graph."""

    def __init__(self) -> None:
        self.value = 0

    def next(self) -> int:
        self.value += 1
        return self.value


async def post_generate(session: aiohttp.ClientSession, url: str, graph: dict[str, Any],
                        headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """POST /generate/sync; raises PerfError unless it completed with an output file."""
    async with session.post(url + "/generate/sync", json={"input": {"workflow_json": graph}},
                            headers=dict(headers or {})) as response:
        body = await response.json(content_type=None)
        if response.status != 200 or body.get("status") != "completed" or not body.get("output"):
            raise PerfError(f"POST {url}/generate/sync answered {response.status}: "
                            f"{json.dumps(body)[:500]}")
        return body


async def timed(call: Callable[[], Awaitable[T]]) -> tuple[float, T]:
    started = time.perf_counter()
    value = await call()
    return time.perf_counter() - started, value


# --- statistics -----------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    """Milliseconds."""

    n: int
    p50: float
    p90: float
    mean: float
    min: float
    max: float

    @classmethod
    def of_seconds(cls, samples: Sequence[float]) -> "Summary":
        return cls.of_ms([s * 1000.0 for s in samples])

    @classmethod
    def of_ms(cls, samples: Sequence[float]) -> "Summary":
        if not samples:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(len(samples), percentile(samples, 50), percentile(samples, 90),
                   sum(samples) / len(samples), min(samples), max(samples))

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


# --- ComfyUI's own clock --------------------------------------------------------------------------
@dataclass(frozen=True)
class RunWindow:
    """When ComfyUI ran one prompt: its execution_start and execution_success/error stamps (ms)."""

    prompt_id: str
    start_ms: int
    end_ms: int


def run_window(prompt_id: str, entry: Mapping[str, Any]) -> RunWindow | None:
    messages = (entry.get("status") or {}).get("messages") or []
    stamps: dict[str, int] = {}
    for item in messages:
        if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], dict):
            stamp = item[1].get("timestamp")
            if isinstance(stamp, (int, float)):
                stamps[str(item[0])] = int(stamp)
    end = next((stamps[k] for k in ("execution_success", "execution_error",
                                    "execution_interrupted") if k in stamps), None)
    if "execution_start" not in stamps or end is None:
        return None
    return RunWindow(prompt_id, stamps["execution_start"], end)


async def run_windows(session: aiohttp.ClientSession, comfy_url: str,
                      prompt_ids: Iterable[str]) -> list[RunWindow]:
    """Each prompt's window from ComfyUI's ``/history``, in the order ComfyUI ran them."""
    windows = []
    for prompt_id in prompt_ids:
        async with session.get(f"{comfy_url}/history/{prompt_id}") as response:
            payload = await response.json()
        window = run_window(prompt_id, payload.get(prompt_id) or {})
        if window is None:
            raise PerfError(f"ComfyUI's history has no run times for prompt {prompt_id}")
        windows.append(window)
    return sorted(windows, key=lambda w: w.start_ms)


def idle_gaps(windows: Sequence[RunWindow]) -> list[float]:
    """Milliseconds ComfyUI sat idle between one prompt's end and the next one's start."""
    return [float(b.start_ms - a.end_ms) for a, b in zip(windows, windows[1:])]


def gap_figures(windows: Sequence[RunWindow]) -> dict[str, float | None]:
    """Idle gaps (mean, p50, max, ms) and the share of the span ComfyUI spent running."""
    gaps = idle_gaps(windows)
    busy = sum(w.end_ms - w.start_ms for w in windows)
    span = windows[-1].end_ms - windows[0].start_ms if windows else 0
    return {"gap_mean_ms": round(sum(gaps) / len(gaps), 2) if gaps else None,
            "gap_p50_ms": percentile(gaps, 50) if gaps else None,
            "gap_max_ms": max(gaps, default=None),
            "comfyui_busy_pct": round(100.0 * busy / span, 1) if span else None}


async def back_to_back_round(session: aiohttp.ClientSession, url: str, comfy_url: str,
                             count: int, counter: Counter,
                             headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``count`` requests at once to ``url``: the total time and ComfyUI's idle gaps."""
    graphs = [tiny_graph(counter.next()) for _ in range(count)]
    started = time.perf_counter()
    answers = await asyncio.gather(*(post_generate(session, url, g, headers) for g in graphs))
    total_ms = (time.perf_counter() - started) * 1000
    windows = await run_windows(session, comfy_url, [a["prompt_id"] for a in answers])
    return {"total_ms": round(total_ms, 2), **gap_figures(windows)}


# --- CPU ------------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (its threads included, its children not)."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def _cpu_block(call: Callable[[], Awaitable[Any]], count: int,
                     pids: Mapping[str, int]) -> dict[str, float]:
    """Run ``call`` ``count`` times in a row; CPU seconds of this process and of ``pids``."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.process_time()
    for _ in range(count):
        await call()
    spent = {"client": time.process_time() - started}
    spent.update({name: cpu_seconds(pid) - before[name] for name, pid in pids.items()})
    return spent


async def cpu_per_request(calls: Mapping[str, Callable[[], Awaitable[Any]]], count: int,
                          pids: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """CPU milliseconds per request of each path in ``calls``, spent by this process
    (``client``) and by each process in ``pids``.

    Wall time on a shared machine swings with its load; CPU time much less. Each path runs in
    two blocks in mirrored order (A B C C B A): ComfyUI slows down steadily as its output folder
    fills, and the mirror makes that drift weigh on every path alike. The kernel counts other
    processes' CPU in ticks (10 ms), so ``count`` should make each total a few hundred ms.
    """
    half = max(1, count // 2)
    totals: dict[str, dict[str, float]] = {name: {} for name in calls}
    for name in [*calls, *reversed(list(calls))]:
        for process, seconds in (await _cpu_block(calls[name], half, pids)).items():
            totals[name][process] = totals[name].get(process, 0.0) + seconds
    return {name: {process: round(seconds / (2 * half) * 1000, 3)
                   for process, seconds in spent.items()}
            for name, spent in totals.items()}


# --- memory ---------------------------------------------------------------------------------------
def memory_mb(pid: int) -> dict[str, float | None]:
    """RSS, and USS/PSS where the platform can tell them, in MiB."""
    import psutil

    process = psutil.Process(pid)
    try:
        info = process.memory_full_info()
    except (psutil.AccessDenied, AttributeError):
        info = process.memory_info()
    mib = 1024 * 1024
    return {"rss": round(info.rss / mib, 1),
            "uss": round(info.uss / mib, 1) if hasattr(info, "uss") else None,
            "pss": round(info.pss / mib, 1) if hasattr(info, "pss") else None}


# --- output ---------------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.2f}"
    return "n/a" if value is None else str(value)


def note(text: str) -> None:
    """Progress goes to stderr so that ``--json`` output stays clean."""
    print(text, file=sys.stderr, flush=True)


def common_arguments(parser: argparse.ArgumentParser, default_n: int) -> None:
    parser.add_argument("--n", type=int, default=default_n,
                        help=f"sequential requests per path (default {default_n})")
    parser.add_argument("--concurrent", type=int, default=20,
                        help="requests sent at once for the back-to-back test (default 20)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="requests per path before measuring (default 10)")
    parser.add_argument("--step-seconds", type=float, default=0.001,
                        help="the simulator's seconds per sampler step (default 0.001)")
    parser.add_argument("--cpu-n", type=int, default=200,
                        help="requests per path for the CPU-time figures (default 200; 0 skips)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (logs, outputs) and print its path")
    parser.add_argument("--time-limit", type=float, default=300.0,
                        help="give up after this many seconds of measuring (default 300)")


def run_script(name: str, args: Any, body: Callable[[Path], dict], render: Callable[[dict], str],
               expected: tuple[type[BaseException], ...] = ()) -> int:
    """Run one script's measurement in a fresh work folder; print the report; exit status.

    `body(workdir)` starts what it needs and returns the report. The folder is removed after
    unless --keep; a PerfError (or one of `expected`) or the time limit ends it with status 1."""
    install_stop_signals()
    workdir = Path(tempfile.mkdtemp(prefix="comfy-worker-perf-"))
    try:
        report = body(workdir)
    except (PerfError, *expected) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"{name}: gave up after {args.time_limit:g} s (--time-limit)", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            note(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0
