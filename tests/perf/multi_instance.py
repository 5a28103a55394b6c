"""Throughput of N instances against one, and what each extra instance costs in memory.

    .venv/bin/python -m tests.perf.multi_instance [--gpus 4] [--json]

Starts the whole worker twice with the ComfyUI simulator on fake GPUs (GPU_FAKE_SOURCE): once
with one GPU, once with ``--gpus``. Each time it sends ``--per-instance`` x instances requests at
once whose sampler takes ``--steps`` x ``--step-seconds`` (1 s by default) and times them, so

* throughput: requests per second with N instances over requests per second with one (target
  >= 0.9 x N: the instances run side by side, and the supervisor does not serialise them);
* memory: PSS (RSS beside it) of the supervisor and of every wrapper, after the load; the cost of
  one extra instance is (total with N - total with one) / (N - 1) (target <= 30 MB PSS). The
  simulators play ComfyUI and are not counted: a real ComfyUI is the GPU's, not ours.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from supervisor.reporting.admin import admin_request
from tests.perf.common import (
    PerfError,
    clean_env,
    free_port,
    free_port_run,
    http_status,
    launch,
    memory_mb,
    note,
    run_bounded,
    run_script,
    serving,
    table,
)

TOKEN = "perf-token"
READY_TIMEOUT = 180.0
THROUGHPUT_TARGET = 0.9
PSS_TARGET_MB = 30.0


def start_worker(workdir: Path, gpus: int, args: argparse.Namespace):
    folder = workdir / f"gpus-{gpus}"
    folder.mkdir()
    fake = folder / "gpus.json"
    fake.write_text(json.dumps({"gpus": [{"preset": "h100_sxm"}] * gpus}))
    comfy_port, wrapper_port, public_port = free_port_run(gpus), free_port_run(gpus), free_port()
    command = [sys.executable, "-m", "simulator", "--listen", "127.0.0.1", "--port", "{port}",
               "--base-directory", str(folder / "comfyui"), "{instance_folders}",
               "--device-type", "cuda", "--step-seconds", str(args.step_seconds)]
    settings = dict(
        COMFYUI_COMMAND=json.dumps(command), COMFYUI_CWD=str(folder),
        COMFYUI_URL=f"http://127.0.0.1:{comfy_port}", WRAPPER_URL=f"http://127.0.0.1:{wrapper_port}",
        WORKER_HOST="127.0.0.1", WORKER_PORT=str(public_port),
        WORKER_STATE_DIR=str(folder / "state"), WORKER_LOG_DIR=str(folder / "logs"),
        WORKER_ADMIN_SOCKET=str(folder / "admin.sock"), WORKER_AUTH_TOKEN=TOKEN,
        GPU_FAKE_SOURCE=str(fake), GPU_REQUIRED="true", BENCHMARK_ENABLED="false",
        METRICS_PORT="0", WORKER_DRAIN_TIMEOUT="3", SUPERVISOR_CHILD_STOP_TIMEOUT="3")
    daemon = launch(f"the worker on {gpus} GPU(s)", [sys.executable, "-m", "supervisor.commands.cli", "run"],
                    clean_env(**settings), folder / "daemon.log",
                    f"http://127.0.0.1:{public_port}", new_session=True)
    return daemon, folder / "admin.sock"


def body(steps: int, index: int) -> dict[str, Any]:
    return {"input": {"modifier": "Text2Image", "modifications": {
        "prompt": f"perf {index}", "steps": steps, "width": 64, "height": 64}}}


async def burst(url: str, count: int, steps: int) -> tuple[float, list[int]]:
    """`count` requests at once; the seconds until the last answer, and each one's instance."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def one(index: int) -> int:
            async with session.post(url + "/generate/sync", json=body(steps, index),
                                    headers=auth) as answer:
                data = await answer.json()
                if answer.status != 200:
                    raise PerfError(f"request {index}: {answer.status} {data}")
                return data["served_by"]["instance"]

        await one(-1)  # warm: the first run of a graph loads its model
        began = time.monotonic()
        served = await asyncio.gather(*(one(i) for i in range(count)))
        return time.monotonic() - began, list(served)


def measure(workdir: Path, gpus: int, args: argparse.Namespace) -> dict[str, Any]:
    daemon, socket = start_worker(workdir, gpus, args)

    def ready() -> bool:
        return http_status(daemon.url + "/health") == 200 and all(
            i["state"] == "ready"
            for i in asyncio.run(admin_request(socket, "GET", "/status"))["instances"])

    with serving(daemon, ready, READY_TIMEOUT, grace=30):
        count = args.per_instance * gpus
        note(f"{gpus} instance(s): {count} requests of {args.steps} x {args.step_seconds:g} s "
             "at once")
        seconds, served = run_bounded(burst(daemon.url, count, args.steps), args.time_limit)
        status = asyncio.run(admin_request(socket, "GET", "/status"))
        memory = {"supervisor": memory_mb(status["worker"]["pid"])}
        for instance in status["instances"]:
            memory[f"wrapper {instance['instance']}"] = memory_mb(
                instance["children"]["wrapper"]["pid"])
    return {"instances": gpus, "requests": count, "seconds": round(seconds, 3),
            "requests_per_second": round(count / seconds, 3),
            "per_instance": {str(n): served.count(n) for n in range(gpus)},
            "memory_mb": memory,
            "total_pss_mb": round(sum(m["pss"] or 0 for m in memory.values()), 1),
            "total_rss_mb": round(sum(m["rss"] for m in memory.values()), 1)}


def run(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    one = measure(workdir, 1, args)
    many = measure(workdir, args.gpus, args)
    speedup = many["requests_per_second"] / one["requests_per_second"]
    extra = args.gpus - 1
    return {"one": one, "many": many, "speedup": round(speedup, 2),
            "speedup_target": THROUGHPUT_TARGET * args.gpus,
            "pss_per_extra_instance_mb": round((many["total_pss_mb"] - one["total_pss_mb"])
                                               / extra, 1),
            "rss_per_extra_instance_mb": round((many["total_rss_mb"] - one["total_rss_mb"])
                                               / extra, 1),
            "pss_target_mb": PSS_TARGET_MB}


def render(report: dict[str, Any]) -> str:
    one, many = report["one"], report["many"]
    rows = [[f"{r['instances']} instance(s)", r["requests"], r["seconds"],
             r["requests_per_second"], r["total_pss_mb"], r["total_rss_mb"]] for r in (one, many)]
    lines = [table(["worker", "requests", "seconds", "req/s", "PSS MiB", "RSS MiB"], rows), ""]
    met = "met" if report["speedup"] >= report["speedup_target"] else "NOT met"
    lines.append(f"throughput: {report['speedup']:.2f}x with {many['instances']} instances "
                 f"(target >= {report['speedup_target']:.1f}x: {met}); requests per instance "
                 f"{many['per_instance']}")
    met = "met" if report["pss_per_extra_instance_mb"] <= report["pss_target_mb"] else "NOT met"
    lines.append(f"memory per extra instance (supervisor + wrappers): "
                 f"PSS {report['pss_per_extra_instance_mb']:.1f} MiB (target <= "
                 f"{report['pss_target_mb']:g}: {met}), RSS "
                 f"{report['rss_per_extra_instance_mb']:.1f} MiB")
    lines.append("")
    lines.append(table(["process", "PSS MiB", "RSS MiB", "USS MiB"],
                       [[name, m["pss"], m["rss"], m["uss"]]
                        for name, m in many["memory_mb"].items()]))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=4, help="instances to compare with one")
    parser.add_argument("--per-instance", type=int, default=3,
                        help="requests per instance sent at once (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps per request")
    parser.add_argument("--step-seconds", type=float, default=0.1,
                        help="the simulator's seconds per step (default 0.1: 1 s a request)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--time-limit", type=float, default=300.0,
                        help="give up after this many seconds of measuring (default 300)")
    args = parser.parse_args()
    if args.gpus < 2:
        parser.error("--gpus must be at least 2")
    return run_script("multi_instance", args, lambda workdir: run(workdir, args), render)


if __name__ == "__main__":
    sys.exit(main())
