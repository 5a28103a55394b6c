"""The same traffic through the vastai SDK's own worker and through comfy-worker; what each
tells the autoscaler, side by side.

    .venv/bin/python -m tests.perf.vast_compare [--step-seconds 0.05] [--steps 10] [--json]

Both run in front of the ComfyUI simulator, one request taking about steps x step-seconds:

* the SDK's worker (`tests.perf.vast_sdk_worker`, configured as Vast's ComfyUI worker) in front
  of this project's API wrapper, which fronts the simulator;
* comfy-worker (`comfy-worker run`) with the simulator as its ComfyUI and its start-up benchmark
  on the same request.

Each reports to a stand-in autoscaler of its own (tests/support/fake_autoscaler.py) that routes
only to a worker whose report says it is ready. The SDK's own client (`CoroutineServerless` +
`Endpoint.request`) then sends, to each in turn: `--steady` requests one after another, a burst
of `--burst` at once (the client retries what is refused with 429), and one request whose client
leaves after a second. The table shows the first ready report, each phase's load fields (peak or
sum), the finished requests' statuses and the last idle report, field by field.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
from vastai.serverless.client.client import CoroutineServerless
from vastai.serverless.client.endpoint import Endpoint

from tests.perf.common import (
    REPO_ROOT,
    clean_env,
    free_port,
    free_port_run,
    note,
    run_bounded,
    run_script,
    table,
    wrapper_env,
)
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.procs import simulator_command, start_daemon

MASTER_TOKEN = "compare-master-token"
FIELDS = ("loadtime", "max_perf", "cur_load", "new_load", "cur_perf", "rej_load", "error_msg",
          "num_requests_working", "num_requests_recieved", "working_request_idxs",
          "additional_disk_usage", "disk_usage", "cur_capacity", "max_capacity", "version")


def payload(steps: int) -> dict[str, Any]:
    return {"input": {"modifier": "Text2Image", "modifications": {
        "prompt": "a lighthouse", "width": 64, "height": 64, "steps": steps}}}


def vast_env(standin: FakeAutoscaler, port: int, container_id: int) -> dict[str, str]:
    return {"REPORT_ADDR": standin.url, "CONTAINER_ID": str(container_id),
            "MASTER_TOKEN": MASTER_TOKEN, "PUBLIC_IPADDR": "127.0.0.1",
            f"VAST_TCP_PORT_{port}": str(port), "USE_SSL": "false", "WORKER_PORT": str(port)}


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        await asyncio.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


async def answers(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


async def until_answers(url: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await answers(url):
            return
        await asyncio.sleep(0.3)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


# --- the traffic ---------------------------------------------------------------------------------
async def settle(standin: FakeAutoscaler) -> None:
    """Wait for a report made after the last activity (both workers send one within a second or
    two of it), so that each phase's reports are its own."""
    ended = time.time()
    await until(lambda: standin.statuses and standin.statuses[-1]["_at"] > ended + 1.2 and
                standin.statuses[-1]["cur_load"] == 0, 30, "a report after the phase")


async def traffic(standin: FakeAutoscaler, args: argparse.Namespace) -> dict[str, Any]:
    """The same three phases against whichever worker `standin` routes to; indexes into the
    stand-in's records where each phase began, and what the client got."""
    client = CoroutineServerless(api_key="compare-account-key", autoscaler_url=standin.url)
    client._ssl_context = ssl.create_default_context()   # not Vast's CA: nothing is https here
    marks: dict[str, Any] = {}
    async with client:
        endpoint = Endpoint(client, name="comfy-compare", id=1, api_key="compare-endpoint-key")
        marks["steady"] = (len(standin.statuses), len(standin.routed))
        for _ in range(args.steady):
            result = await endpoint.request("/generate/sync", payload(args.steps), timeout=120)
            if result.get("status") != 200:
                raise RuntimeError(f"steady request answered {result.get('status')}")
        await settle(standin)
        marks["burst"] = (len(standin.statuses), len(standin.routed))
        results = await asyncio.gather(*(endpoint.request("/generate/sync", payload(args.steps),
                                                          timeout=300)
                                         for _ in range(args.burst)))
        marks["burst_statuses"] = dict(Counter(r.get("status") for r in results))
        await settle(standin)
        marks["cancel"] = (len(standin.statuses), len(standin.routed))
        try:
            await asyncio.wait_for(endpoint.request("/generate/sync",
                                                    payload(args.steps * 6)), 1.0)
        except asyncio.TimeoutError:
            pass
        marks["idle"] = (len(standin.statuses), len(standin.routed))
    # Quiet reports: the cancelled request's end, then the periodic cadence.
    await until(lambda: len(standin.statuses) >= marks["idle"][0] + 3, 60, "idle reports")
    return marks


def summarise(standin: FakeAutoscaler, marks: dict[str, Any], workload: float
              ) -> dict[str, Any]:
    statuses, routed, finished = list(standin.statuses), list(standin.routed), \
        standin.finished()
    by_idx: dict[int, list[dict[str, Any]]] = {}
    for item in finished:
        by_idx.setdefault(item["request_idx"], []).append(item)
    ready = next(r for r in statuses if r["loadtime"])

    def window(name: str, until_name: str) -> list[dict[str, Any]]:
        return statuses[marks[name][0]:marks[until_name][0]]

    def idxs(name: str, until_name: str) -> list[int]:
        return [a["request_idx"] for a in routed[marks[name][1]:marks[until_name][1]]]

    steady = [item for i in idxs("steady", "burst") for item in by_idx.get(i, [])
              if item["status"] == "Success"]
    seconds = statistics.mean(i["work_completed_at"] - i["work_started_at"] for i in steady)
    cancelled = [item for i in idxs("cancel", "idle") for item in by_idx.get(i, [])]
    out: dict[str, Any] = {
        "ready: loadtime (s)": ready["loadtime"],
        "ready: max_perf": ready["max_perf"],
        "seconds per request (steady)": seconds,
        "max_perf x seconds / workload": ready["max_perf"] * seconds / workload,
    }
    for name, nxt in (("steady", "burst"), ("burst", "cancel")):
        part = window(name, nxt)
        out[f"{name}: peak cur_load"] = max(r["cur_load"] for r in part)
        out[f"{name}: peak num_requests_working"] = max(r["num_requests_working"] for r in part)
        for field in ("new_load", "cur_perf", "rej_load"):
            out[f"{name}: sum {field}"] = sum(r[field] for r in part)
    out["burst: client saw"] = marks["burst_statuses"]
    burst_items = [item for i in set(idxs("burst", "cancel")) for item in by_idx.get(i, [])]
    out["burst: /delete_requests/"] = dict(Counter(i["status"] for i in burst_items))
    out["cancelled: status, success"] = \
        [(i["status"], i["success"], i["work_completed_at"]) for i in cancelled]
    out["every /delete_requests/"] = dict(Counter(i["status"] for i in finished))
    idle = statuses[-1]
    for field in FIELDS:
        out[f"idle report: {field}"] = idle[field]
    out["idle: seconds between the last two reports"] = statuses[-1]["_at"] - statuses[-2]["_at"]
    return out


# --- the two workers -----------------------------------------------------------------------------
async def sdk_side(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    standin = FakeAutoscaler(route_when_ready=True)
    await standin.start()
    folder = workdir / "sdk"
    folder.mkdir()
    comfy_port, wrapper_port = free_port(), free_port()
    worker_port = free_port_run(2)      # the SDK also listens on WORKER_PORT + 1
    processes: list[subprocess.Popen] = []

    def start(name: str, argv: list[str], env: dict[str, str]) -> None:
        with open(folder / f"{name}.log", "ab") as log:
            processes.append(subprocess.Popen(argv, cwd=folder, env=env, stdout=log,
                                              stderr=subprocess.STDOUT))

    try:
        start("simulator", json.loads(simulator_command(comfy_port, folder / "comfy",
                                                       "--step-seconds",
                                                       str(args.step_seconds))),
              clean_env())
        await until_answers(f"http://127.0.0.1:{comfy_port}/system_stats", 60, "the simulator")
        start("wrapper", [sys.executable, "-m", "supervisor.commands.cli", "api"],
              wrapper_env(f"http://127.0.0.1:{comfy_port}", folder / "comfy" / "output",
                          folder / "wrapper-state", wrapper_port))
        await until_answers(f"http://127.0.0.1:{wrapper_port}/health", 60, "the wrapper")
        # What Vast's readiness shim writes once ComfyUI and the wrapper answer.
        model_log = folder / "api-wrapper.log"
        model_log.write_text("BACKENDS_READY\n")
        start("sdk-worker", [sys.executable, "-m", "tests.perf.vast_sdk_worker"],
              clean_env(**vast_env(standin, worker_port, 1001),
                        MODEL_SERVER_PORT=str(wrapper_port), MODEL_LOG=str(model_log),
                        BENCH_STEPS=str(args.steps)))
        note("the SDK's worker: benchmark, health, key, then its next periodic report ...")
        await until(lambda: standin.worker_url, 180, "the SDK worker's ready report")
        marks = await traffic(standin, args)
        return summarise(standin, marks, 100.0)
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        await standin.stop()


async def comfy_worker_side(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    standin = FakeAutoscaler(route_when_ready=True)
    standin._reqnum = 500_000
    await standin.start()
    folder = workdir / "comfy-worker"
    folder.mkdir()
    port = free_port()
    env = {**vast_env(standin, port, 1002), "BENCHMARK_ENABLED": "true",
           "BENCHMARK_TEST_WIDTH": "64", "BENCHMARK_TEST_HEIGHT": "64",
           "BENCHMARK_TEST_STEPS": str(args.steps),
           "BENCHMARK_EXPECTED_SECONDS": str(args.steps * args.step_seconds),
           "WORKER_AUTH_TOKEN": None}
    try:
        with start_daemon(folder, "--step-seconds", str(args.step_seconds), port=port,
                          wait_ready=False, extra_env=env) as daemon:
            note("comfy-worker: benchmark, key, ready ...")
            await until(lambda: standin.worker_url or daemon.process.poll() is not None, 180,
                        "comfy-worker's ready report")
            if daemon.process.poll() is not None:
                raise RuntimeError(f"comfy-worker exited: {daemon.log()[-3000:]}")
            marks = await traffic(standin, args)
            return summarise(standin, marks, 100.0)
    finally:
        await standin.stop()


async def compare(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    sides: list[tuple[str, Callable[[Path, argparse.Namespace], Awaitable[dict[str, Any]]]]] = \
        [("vastai SDK worker", sdk_side), ("comfy-worker", comfy_worker_side)]
    report: dict[str, Any] = {"steps": args.steps, "step_seconds": args.step_seconds,
                              "steady": args.steady, "burst": args.burst}
    for name, side in sides:
        note(f"--- {name}")
        report[name] = await side(workdir, args)
    return report


def render(report: dict[str, Any]) -> str:
    sdk, ours = report["vastai SDK worker"], report["comfy-worker"]
    rows = [(key, _show(sdk.get(key)), _show(ours.get(key))) for key in sdk]
    head = (f"Same traffic, both in front of the ComfyUI simulator ({report['steps']} steps x "
            f"{report['step_seconds']:g} s): {report['steady']} one after another, a burst of "
            f"{report['burst']}, one client that leaves after 1 s. Workload 100 a request on "
            "both sides.\n")
    return head + table(["", "vastai SDK 1.9.1 worker", "comfy-worker"], rows)


def _show(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--steady", type=int, default=6)
    parser.add_argument("--burst", type=int, default=25)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--time-limit", type=float, default=900.0)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(REPO_ROOT))
    return run_script("vast_compare", args,
                      lambda workdir: run_bounded(compare(workdir, args), args.time_limit),
                      render, expected=(RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())
