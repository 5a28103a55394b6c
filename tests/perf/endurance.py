"""A long run: tens of thousands of requests through the whole worker, and what stays flat.

    python -m tests.perf.endurance                    # 30,000 requests (make endurance)
    python -m tests.perf.endurance --requests 2000    # a short one

The daemon (`comfy-worker run`) with the simulator as ComfyUI writing 1 MB outputs
(`--image-bytes`), retention at its defaults except a small output cap (`--cap-gb`, so that it
works from the first minutes), every request with a webhook to a local receiver. After a warm-up
and then every `--every` requests it takes a snapshot of the daemon's and the wrapper's RSS and
PSS, open files, sockets, threads and asyncio tasks, and the output folder's size and file count,
the result files and the webhook spool; it prints the first and the last, and the growth per
10,000 requests between them (and between the last two snapshots, where every bound is reached).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import psutil
from aiohttp import web

from supervisor.reporting.admin import admin_request
from tests.perf.common import (
    PerfError,
    Service,
    clean_env,
    free_port,
    http_status,
    launch,
    memory_mb,
    note,
    run_script,
    serving,
    table,
)

TOKEN = "endurance-token"
READY_TIMEOUT = 90.0
MB = 1_000_000


@dataclass
class Stack:
    daemon: Service
    admin_socket: Path
    wrapper_url: str
    output_dir: Path
    input_dir: Path
    state_dir: Path


@contextlib.contextmanager
def start_stack(workdir: Path, args: argparse.Namespace) -> Iterator[Stack]:
    comfy_port, wrapper_port, public_port = free_port(), free_port(), free_port()
    base = workdir / "comfyui"
    command = [sys.executable, "-m", "simulator", "--listen", "127.0.0.1", "--port",
               str(comfy_port), "--base-directory", str(base), "--step-seconds",
               str(args.step_seconds), "--image-bytes", str(args.output_bytes)]
    settings = dict(
        COMFYUI_COMMAND=json.dumps(command), COMFYUI_CWD=str(workdir),
        COMFYUI_URL=f"http://127.0.0.1:{comfy_port}", COMFYUI_INSTALL_PATH=str(base),
        WRAPPER_URL=f"http://127.0.0.1:{wrapper_port}", WORKER_HOST="127.0.0.1",
        WORKER_PORT=str(public_port), WORKER_STATE_DIR=str(workdir / "state"),
        WORKER_LOG_DIR=str(workdir / "logs"), WORKER_ADMIN_SOCKET=str(workdir / "admin.sock"),
        WORKER_AUTH_TOKEN=TOKEN, GPU_REQUIRED="false", BENCHMARK_ENABLED="false",
        METRICS_PORT="0", WORKER_DRAIN_TIMEOUT="5", SUPERVISOR_CHILD_STOP_TIMEOUT="5",
        RETENTION_OUTPUTS_MAX_GB=str(args.cap_gb),
        RETENTION_INTERVAL=str(args.retention_interval),
        WEBHOOK_ALLOW_PRIVATE_TARGETS="true", LOG_LEVEL="WARNING")
    daemon = launch("the daemon", [sys.executable, "-m", "supervisor.commands.cli", "run"],
                    clean_env(**settings), workdir / "daemon.log",
                    f"http://127.0.0.1:{public_port}", new_session=True)
    stack = Stack(daemon, workdir / "admin.sock", settings["WRAPPER_URL"], base / "output",
                  base / "input", workdir / "state")
    with serving(daemon, lambda: http_status(daemon.url + "/health") == 200, READY_TIMEOUT,
                 grace=30.0):
        yield stack


# --- what is measured -----------------------------------------------------------------------------
def folder_figures(folder: Path) -> tuple[int, int]:
    """Bytes (each inode once) and files under `folder`."""
    seen, size, files = set(), 0, 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            files += 1
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                size += st.st_size
    return size, files


def process_figures(pid: int) -> dict[str, Any]:
    process = psutil.Process(pid)
    memory = memory_mb(pid)
    return {"rss_mb": memory["rss"], "pss_mb": memory["pss"], "fds": process.num_fds(),
            "sockets": len(process.net_connections(kind="all")),
            "threads": process.num_threads()}


async def snapshot(stack: Stack, session: aiohttp.ClientSession, served: int) -> dict[str, Any]:
    status = await admin_request(stack.admin_socket, "GET", "/status")
    pids = {name: child.get("pid") for name, child in status["children"].items()}
    async with session.get(stack.wrapper_url + "/health") as answer:
        wrapper = await answer.json(content_type=None)

    def measure() -> dict[str, Any]:
        out_bytes, out_files = folder_figures(stack.output_dir)
        in_bytes, in_files = folder_figures(stack.input_dir)
        results = len(list((stack.state_dir / "results").glob("*.json")))
        spool = len(list((stack.state_dir / "webhooks").glob("*.json")))
        return {"daemon": process_figures(stack.daemon.process.pid),
                "wrapper": process_figures(pids["wrapper"]),
                "output_mb": round(out_bytes / MB, 1), "output_files": out_files,
                "input_files": in_files, "result_files": results, "spool_files": spool}

    figures = await asyncio.to_thread(measure)
    figures["daemon"]["tasks"] = status["worker"].get("asyncio_tasks")
    figures["wrapper"]["tasks"] = wrapper.get("asyncio_tasks")
    figures["served"] = served
    figures["at"] = time.time()
    return figures


# --- traffic --------------------------------------------------------------------------------------
def graph(index: int) -> dict[str, Any]:
    """A small image saved as a 1 MB PNG (the simulator pads it): one output per request."""
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": index % 0xFFFFFF}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                        "filename_prefix": "endurance"}}}


class Receiver:
    """The webhook receiver: counts what it got."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        await request.read()
        self.received += 1
        return web.Response(status=204)


async def drive(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    receiver = Receiver()
    await receiver.start()
    hook = f"http://127.0.0.1:{receiver.port}/hook"
    statuses: dict[int, int] = {}
    sent = 0
    snapshots: list[dict[str, Any]] = []
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:

        async def client() -> None:
            nonlocal sent
            while sent < args.requests:
                sent += 1
                body = {"input": {"workflow_json": graph(sent), "webhook": {"url": hook}}}
                async with session.post(stack.daemon.url + "/generate/sync", json=body) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1

        async def watcher() -> None:
            marks = [args.warmup] + list(range(args.warmup + args.every, args.requests + 1,
                                               args.every))
            for mark in marks:
                while sum(statuses.values()) < mark:
                    await asyncio.sleep(0.5)
                snapshots.append(await snapshot(stack, session, mark))
                done = sum(statuses.values())
                rate = done / (time.monotonic() - started)
                note(f"{done} requests, {rate:.0f}/s; {_line(snapshots[-1])}")

        clients = [asyncio.create_task(client()) for _ in range(args.concurrency)]
        watching = asyncio.create_task(watcher())
        await asyncio.gather(*clients)
        await asyncio.sleep(args.settle)  # webhooks delivered, a retention pass
        watching.cancel()
        final = await snapshot(stack, session, sum(statuses.values()))
        if not snapshots or final["served"] != snapshots[-1]["served"]:
            snapshots.append(final)
        else:
            snapshots[-1] = final
    await receiver.stop()
    elapsed = time.monotonic() - started
    if set(statuses) != {200}:
        raise PerfError(f"not every request succeeded: {statuses}")
    return {"requests": sum(statuses.values()), "statuses": statuses,
            "seconds": round(elapsed, 1), "per_second": round(sum(statuses.values()) / elapsed, 1),
            "webhooks_received": receiver.received, "snapshots": snapshots,
            "output_bytes": args.output_bytes, "cap_gb": args.cap_gb,
            "concurrency": args.concurrency, "cpus": os.cpu_count(),
            "load_before": args.load_before}


def _line(s: dict[str, Any]) -> str:
    d, w = s["daemon"], s["wrapper"]
    return (f"daemon {d['rss_mb']} MB rss, {d['fds']} fds, {d['tasks']} tasks; wrapper "
            f"{w['rss_mb']} MB rss, {w['fds']} fds, {w['tasks']} tasks; output "
            f"{s['output_mb']} MB in {s['output_files']} files")


# --- the report -----------------------------------------------------------------------------------
ROWS = [("daemon", "rss_mb"), ("daemon", "pss_mb"), ("daemon", "fds"), ("daemon", "sockets"),
        ("daemon", "threads"), ("daemon", "tasks"), ("wrapper", "rss_mb"), ("wrapper", "pss_mb"),
        ("wrapper", "fds"), ("wrapper", "sockets"), ("wrapper", "threads"), ("wrapper", "tasks"),
        (None, "output_mb"), (None, "output_files"), (None, "input_files"),
        (None, "result_files"), (None, "spool_files")]


def value(s: dict[str, Any], where: str | None, key: str) -> Any:
    return s[where][key] if where else s[key]


def growth(a: dict[str, Any], b: dict[str, Any], where: str | None, key: str) -> float | None:
    first, last = value(a, where, key), value(b, where, key)
    span = b["served"] - a["served"]
    if first is None or last is None or span <= 0:
        return None
    return round((last - first) * 10_000 / span, 2)


def render(report: dict[str, Any]) -> str:
    shots = report["snapshots"]
    first, last = shots[0], shots[-1]
    late = shots[-2] if len(shots) > 2 else first
    rows = [[f"{where or 'folders'} {key}", value(first, where, key), value(last, where, key),
             growth(first, last, where, key), growth(late, last, where, key)]
            for where, key in ROWS]
    head = (f"endurance: {report['requests']} requests in {report['seconds']} s "
            f"({report['per_second']}/s, {report['concurrency']} at once), "
            f"{report['output_bytes'] / MB:g} MB outputs, output cap {report['cap_gb']} GB, "
            f"{report['webhooks_received']} webhooks received; "
            f"{report['cpus']} CPUs, load before {report['load_before']}")
    return "\n".join([head, "", table(
        ["figure", f"at {first['served']}", f"at {last['served']}", "per 10k (whole run)",
         f"per 10k (from {late['served']})"], rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.perf.endurance",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--warmup", type=int, default=1_000,
                        help="requests before the first snapshot (default 1000)")
    parser.add_argument("--every", type=int, default=5_000, help="requests between snapshots")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--output-bytes", type=int, default=MB,
                        help="size of each output PNG (default 1 MB)")
    parser.add_argument("--cap-gb", type=float, default=0.5,
                        help="retention.outputs_max_gb for the run (default 0.5)")
    parser.add_argument("--retention-interval", type=float, default=5.0,
                        help="retention.interval for the run (default 5 s: at this rate a "
                             "minute writes GBs)")
    parser.add_argument("--step-seconds", type=float, default=0.001)
    parser.add_argument("--settle", type=float, default=8.0,
                        help="seconds after the last request before the last snapshot")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--time-limit", type=float, default=3600.0)
    args = parser.parse_args(argv)
    if args.warmup >= args.requests:
        parser.error("--warmup must be below --requests")
    args.load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())

    def body(workdir: Path) -> dict[str, Any]:
        with start_stack(workdir, args) as stack:
            return asyncio.run(asyncio.wait_for(drive(stack, args), args.time_limit))

    return run_script("endurance", args, body, render)


if __name__ == "__main__":
    raise SystemExit(main())
