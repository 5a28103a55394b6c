"""The whole worker (`comfy-worker run`) against the ComfyUI simulator: latency, idle gaps,
crash-to-ready time and memory.

    .venv/bin/python -m tests.perf.stack_latency [--n 200] [--json]

Starts the daemon with the simulator as its ComfyUI (no GPU, no start-up benchmark, a bearer
token), then measures:

1. *sequential*: ``--n`` tiny workflows (EmptyImage 64x64 -> SaveImage, a new colour each time)
   through the public port, through the wrapper's own port and with ``ComfyClient.run_prompt``
   straight on ComfyUI, interleaved; p50/p90/mean of each, what the whole stack adds and how it
   splits between the wrapper and the supervisor. Beside them (unless ``--no-floor``) the same
   through a bare aiohttp forwarder in front of the same wrapper (``tests/perf/bare_forward.py``):
   the cost of one HTTP hop in Python on this machine, which the supervisor cannot go below;
2. *back-to-back*: ``--concurrent`` requests at once on the public port; the idle time ComfyUI had
   between one prompt's end and the next one's start, from ComfyUI's own timestamps;
3. *memory*: RSS (and USS/PSS) of the supervisor and of the wrapper after the load above;
4. *crash-to-ready*: SIGKILL the ComfyUI child and time until ``/health`` says 200 again, and until
   a request completes; ``--crashes`` times (the restart back-off doubles on each crash).

Targets (from the issues): the stack adds <= 2.5 ms at p50; supervisor + wrapper RSS <= 80 MB.
Supervisor timings are the product defaults unless ``--probe-interval``/``--backoff-initial``
are given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import psutil

from api.comfy import ComfyClient, PromptStatus
from config import BY_NAME
from supervisor.reporting.admin import admin_request
from tests.perf.common import (
    Counter,
    PerfError,
    Service,
    Summary,
    back_to_back_round,
    clean_env,
    common_arguments,
    cpu_per_request,
    free_port,
    http_status,
    launch,
    memory_mb,
    note,
    percentile,
    post_generate,
    run_bounded,
    run_script,
    run_window,
    serving,
    start_floor,
    table,
    timed,
    tiny_graph,
)

ADDED_P50_TARGET_MS = 2.5
RSS_TARGET_MB = 80.0
TOKEN = "perf-token"
READY_TIMEOUT = 60.0
CRASH_TIMEOUT = 60.0
DAEMON_STOP_GRACE = 30.0


@dataclass
class Stack:
    daemon: Service
    comfy_url: str
    wrapper_url: str
    admin_socket: Path
    output_dir: Path
    children: dict[int, float] = field(default_factory=dict)  # pid -> create time, to sweep up
    floor: Service | None = None   # the bare forwarder in front of the wrapper (--no-floor: none)

    @property
    def public_url(self) -> str:
        return self.daemon.url

    async def status(self) -> dict[str, Any]:
        return await admin_request(self.admin_socket, "GET", "/status")

    async def child_pid(self, name: str) -> int:
        pid = (await self.status())["children"][name]["pid"]
        if not pid:
            raise PerfError(f"the daemon reports no running {name}")
        with contextlib.suppress(psutil.Error):
            self.children[pid] = psutil.Process(pid).create_time()
        return pid

    def sweep(self) -> None:
        """Kill children that outlived the daemon (same pid *and* start time: still ours)."""
        for pid, created in self.children.items():
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if process.create_time() == created:
                    process.kill()


@contextlib.contextmanager
def start_stack(workdir: Path, args: argparse.Namespace) -> Iterator[Stack]:
    comfy_port, wrapper_port, public_port = free_port(), free_port(), free_port()
    base = workdir / "comfyui"
    comfy_command = [sys.executable, "-m", "simulator", "--listen", "127.0.0.1", "--port",
                     str(comfy_port), "--base-directory", str(base),
                     "--step-seconds", str(args.step_seconds)]
    settings = dict(
        COMFYUI_COMMAND=json.dumps(comfy_command), COMFYUI_CWD=str(workdir),
        COMFYUI_URL=f"http://127.0.0.1:{comfy_port}", COMFYUI_OUTPUT_DIR=str(base / "output"),
        WRAPPER_URL=f"http://127.0.0.1:{wrapper_port}", WORKER_HOST="127.0.0.1",
        WORKER_PORT=str(public_port), WORKER_STATE_DIR=str(workdir / "state"),
        WORKER_LOG_DIR=str(workdir / "logs"), WORKER_ADMIN_SOCKET=str(workdir / "admin.sock"),
        WORKER_AUTH_TOKEN=TOKEN, GPU_REQUIRED="false", BENCHMARK_ENABLED="false",
        # Only how long a stop may take; nothing measured depends on these two.
        WORKER_DRAIN_TIMEOUT="3", SUPERVISOR_CHILD_STOP_TIMEOUT="3")
    if args.probe_interval is not None:
        settings["SUPERVISOR_PROBE_INTERVAL"] = str(args.probe_interval)
    if args.backoff_initial is not None:
        settings["SUPERVISOR_BACKOFF_INITIAL"] = str(args.backoff_initial)
    daemon = launch("the daemon", [sys.executable, "-m", "supervisor.commands.cli", "run"],
                    clean_env(**settings), workdir / "daemon.log",
                    f"http://127.0.0.1:{public_port}", new_session=True)
    stack = Stack(daemon, settings["COMFYUI_URL"], settings["WRAPPER_URL"],
                  workdir / "admin.sock", base / "output")
    try:
        with serving(daemon, lambda: http_status(daemon.url + "/health") == 200, READY_TIMEOUT,
                     grace=DAEMON_STOP_GRACE):
            yield stack
    finally:
        stack.sweep()


# --- measurements ---------------------------------------------------------------------------------
async def sequential(args: argparse.Namespace, stack: Stack, session: aiohttp.ClientSession,
                     client: ComfyClient, counter: Counter, floor_url: str | None = None
                     ) -> dict[str, Any]:
    """`floor_url`, when given, is a bare forwarder in front of the wrapper
    (tests/perf/bare_forward.py): what the public port adds beyond it is the supervisor's own
    work."""
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def direct() -> Any:
        result = await client.run_prompt(tiny_graph(counter.next()))
        if result.status is not PromptStatus.SUCCESS or not result.outputs:
            raise PerfError(f"ComfyUI did not complete prompt {result.prompt_id}: {result.status}")
        return result

    async def wrapper() -> Any:
        return await post_generate(session, stack.wrapper_url, tiny_graph(counter.next()))

    async def public() -> Any:
        return await post_generate(session, stack.public_url, tiny_graph(counter.next()), auth)

    async def floor() -> Any:
        assert floor_url is not None
        return await post_generate(session, floor_url, tiny_graph(counter.next()))

    paths = {"direct": direct, "wrapper": wrapper, "public": public}
    if floor_url is not None:
        paths["floor"] = floor
    note(f"warm-up: {args.warmup} requests per path")
    for _ in range(args.warmup):
        for call in paths.values():
            await call()
    note(f"sequential: {args.n} requests per path, interleaved")
    samples: dict[str, list[float]] = {name: [] for name in paths}
    paired: dict[str, list[float]] = {"stack": [], "wrapper": [], "supervisor": []}
    comfy_run_ms: list[float] = []
    names = list(paths)
    for i in range(args.n):
        # Rotate the order so that no path always runs right after the same other one.
        order = names[i % len(names):] + names[:i % len(names)]
        took: dict[str, float] = {}
        for name in order:
            took[name], answer = await timed(paths[name])
            if name == "direct":
                window = run_window(answer.prompt_id, answer.history or {})
                if window is not None:
                    comfy_run_ms.append(float(window.end_ms - window.start_ms))
        for name, value in took.items():
            samples[name].append(value)
        paired["stack"].append((took["public"] - took["direct"]) * 1000)
        paired["wrapper"].append((took["wrapper"] - took["direct"]) * 1000)
        paired["supervisor"].append((took["public"] - took["wrapper"]) * 1000)
    cpu: dict[str, dict[str, float]] = {}
    if args.cpu_n:
        note(f"CPU time: {args.cpu_n} requests per path, in blocks")
        pids = {"supervisor": stack.daemon.process.pid,
                "wrapper": await stack.child_pid("wrapper"),
                "comfyui": await stack.child_pid("comfyui")}
        if stack.floor is not None:
            pids["floor"] = stack.floor.process.pid
        cpu = await cpu_per_request(paths, args.cpu_n, pids)
    summaries = {name: Summary.of_seconds(values) for name, values in samples.items()}
    floor_figures = {}
    if "floor" in summaries:
        floor_figures = {"floor_added_p50_ms": {
            "hop": round(summaries["floor"].p50 - summaries["wrapper"].p50, 3),
            "supervisor_beyond_hop": round(summaries["public"].p50 - summaries["floor"].p50, 3)}}
    return {
        "cpu_ms_per_request": cpu,
        "ms": {**{name: s.to_json() for name, s in summaries.items()},
               "comfyui_run": Summary.of_ms(comfy_run_ms).to_json()},
        "added_p50_ms": {
            "stack": round(summaries["public"].p50 - summaries["direct"].p50, 3),
            "wrapper": round(summaries["wrapper"].p50 - summaries["direct"].p50, 3),
            "supervisor": round(summaries["public"].p50 - summaries["wrapper"].p50, 3)},
        "added_p90_ms": {"stack": round(summaries["public"].p90 - summaries["direct"].p90, 3)},
        "paired_median_ms": {k: round(percentile(v, 50), 3) for k, v in paired.items()},
        **floor_figures,
    }


async def back_to_back(args: argparse.Namespace, stack: Stack, session: aiohttp.ClientSession,
                       counter: Counter, single_ms: float) -> list[dict[str, Any]]:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    rounds = []
    for r in range(args.rounds):
        note(f"back-to-back: {args.concurrent} requests at once on the public port "
             f"(round {r + 1}/{args.rounds})")
        figures = await back_to_back_round(session, stack.public_url, stack.comfy_url,
                                           args.concurrent, counter, auth)
        rounds.append({**figures,
                       "ratio": round(figures["total_ms"] / (args.concurrent * single_ms), 3)})
    return rounds


async def memory(stack: Stack) -> dict[str, Any]:
    supervisor = memory_mb(stack.daemon.process.pid)
    wrapper = memory_mb(await stack.child_pid("wrapper"))
    comfyui = memory_mb(await stack.child_pid("comfyui"))
    total = {k: (round(supervisor[k] + wrapper[k], 1)
                 if supervisor[k] is not None and wrapper[k] is not None else None)
             for k in supervisor}
    return {"supervisor": supervisor, "wrapper": wrapper, "supervisor_plus_wrapper": total,
            "comfyui_simulator": comfyui}


async def crash_to_ready(args: argparse.Namespace, stack: Stack, session: aiohttp.ClientSession,
                         counter: Counter) -> list[dict[str, Any]]:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    health = stack.public_url + "/health"
    results = []
    for attempt in range(args.crashes):
        pid = await stack.child_pid("comfyui")
        if "simulator" not in " ".join(psutil.Process(pid).cmdline()):
            raise PerfError(f"pid {pid} is not the simulator the daemon started; not killing it")
        note(f"crash-to-ready: SIGKILL to ComfyUI (pid {pid}), "
             f"attempt {attempt + 1}/{args.crashes}")
        killed = time.perf_counter()
        psutil.Process(pid).send_signal(signal.SIGKILL)
        detected = ready = None
        deadline = killed + CRASH_TIMEOUT
        while time.perf_counter() < deadline:
            try:
                async with session.get(health, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    ok = response.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            now = time.perf_counter()
            if not ok and detected is None:
                detected = now
            elif ok and detected is not None:
                ready = now
                break
            await asyncio.sleep(0.005)
        if ready is None or detected is None:
            what = "turn unhealthy" if detected is None else "recover"
            raise PerfError(f"/health did not {what} within {CRASH_TIMEOUT:g} s of the SIGKILL")
        await post_generate(session, stack.public_url, tiny_graph(counter.next()), auth)
        served = time.perf_counter()
        status = await stack.status()
        results.append({"detect_ms": round((detected - killed) * 1000, 1),
                        "ready_ms": round((ready - killed) * 1000, 1),
                        "first_request_ms": round((served - killed) * 1000, 1),
                        "comfyui_restarts": status["children"]["comfyui"]["restarts"]})
    return results


def supervisor_timings(args: argparse.Namespace) -> dict[str, float]:
    """The probe interval and first back-off the daemon ran with (given, else the default)."""
    return {"probe_interval": args.probe_interval if args.probe_interval is not None
            else BY_NAME["supervisor.probe_interval"].default,
            "backoff_initial": args.backoff_initial if args.backoff_initial is not None
            else BY_NAME["supervisor.backoff_initial"].default}


async def measure(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    counter = Counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session, \
            ComfyClient(stack.comfy_url, output_dir=stack.output_dir) as client:
        idle = await memory(stack)  # also remembers the children's pids, to sweep them up
        seq = await sequential(args, stack, session, client, counter,
                               stack.floor.url if stack.floor is not None else None)
        rounds = await back_to_back(args, stack, session, counter, seq["ms"]["public"]["p50"])
        mem = await memory(stack)
        served = counter.value
        crashes = await crash_to_ready(args, stack, session, counter) if args.crashes else []
        settings = (await stack.status()).get("children", {})
    added = seq["added_p50_ms"]["stack"]
    rss = mem["supervisor_plus_wrapper"]["rss"]
    return {
        "n": args.n,
        "sequential": seq,
        "back_to_back": {"concurrent": args.concurrent, "rounds": rounds},
        "memory_mb": {"at_start": idle, "after_load": mem, "requests_served": served},
        "crash_to_ready": crashes,
        "supervisor_timings": supervisor_timings(args),
        "children_after": {k: {"state": v.get("state"), "restarts": v.get("restarts")}
                           for k, v in settings.items()},
        "targets": {"added_p50_le_2_5ms": added <= ADDED_P50_TARGET_MS,
                    "rss_le_80mb": rss is not None and rss <= RSS_TARGET_MB},
    }


def render(report: dict[str, Any]) -> str:
    seq = report["sequential"]
    ms = seq["ms"]
    cols = ("p50", "p90", "mean", "min", "max")
    added = seq["added_p50_ms"]
    paired = seq["paired_median_ms"]
    b2b = report["back_to_back"]
    start, mem = report["memory_mb"]["at_start"], report["memory_mb"]["after_load"]
    rows = [("direct ComfyClient", *(ms["direct"][c] for c in cols)),
            ("wrapper port", *(ms["wrapper"][c] for c in cols)),
            ("public port (full stack)", *(ms["public"][c] for c in cols))]
    if "floor" in ms:
        rows.append(("bare forwarder -> wrapper", *(ms["floor"][c] for c in cols)))
    rows.append(("ComfyUI run itself", *(ms["comfyui_run"][c] for c in cols)))
    lines = [
        f"Sequential tiny workflow (EmptyImage 64x64 -> SaveImage), n={report['n']} per path, ms",
        table(("path", *cols), rows),
        f"added at p50: full stack {added['stack']:+.2f} ms = wrapper {added['wrapper']:+.2f} ms "
        f"+ supervisor {added['supervisor']:+.2f} ms (paired medians: {paired['stack']:+.2f} = "
        f"{paired['wrapper']:+.2f} + {paired['supervisor']:+.2f}); full stack at p90 "
        f"{seq['added_p90_ms']['stack']:+.2f} ms",
    ]
    if "floor_added_p50_ms" in seq:
        floor = seq["floor_added_p50_ms"]
        lines.append(f"a bare aiohttp forwarder in front of the same wrapper (one HTTP hop, nothing "
                     f"else) adds: p50 {floor['hop']:+.2f} ms; the supervisor beyond it "
                     f"{floor['supervisor_beyond_hop']:+.2f} ms")
    cpu = seq["cpu_ms_per_request"]
    if cpu:
        procs = ("client", "supervisor", "wrapper", "comfyui")
        if "floor" in cpu:
            procs += ("floor",)
        ours = {name: sum(cpu[name][p] for p in ("client", "supervisor", "wrapper"))
                for name in cpu}
        lines += [
            "",
            "CPU time per request, ms (client = this script, which runs the direct ComfyClient; "
            "includes the supervisor's background probes)",
            table(("path", *procs, "total"),
                  [(name, *(cpu[name][p] for p in procs), sum(cpu[name][p] for p in procs))
                   for name in cpu]),
            f"extra CPU (client + supervisor + wrapper) against the direct path: wrapper port "
            f"{ours['wrapper'] - ours['direct']:+.2f} ms, public port "
            f"{ours['public'] - ours['direct']:+.2f} ms",
        ]
        if "floor" in cpu:
            lines.append(f"the public port's hop costs the supervisor "
                         f"{cpu['public']['supervisor'] - cpu['wrapper']['supervisor']:.2f} ms "
                         f"of CPU, the bare forwarder's "
                         f"{cpu['floor']['floor'] - cpu['wrapper']['floor']:.2f} ms")
    lines += [
        "",
        f"Back-to-back: {b2b['concurrent']} requests at once on the public port",
        table(("round", "total ms", "ratio to N x single", "ComfyUI idle gap mean", "p50", "max",
               "ComfyUI busy %"),
              [(i + 1, r["total_ms"], r["ratio"], r["gap_mean_ms"], r["gap_p50_ms"],
                r["gap_max_ms"], r["comfyui_busy_pct"]) for i, r in enumerate(b2b["rounds"])]),
        "",
        "Memory, MiB: once ready, and after the load above "
        f"({report['memory_mb']['requests_served']} workflows on all paths)",
        table(("process", "RSS ready", "USS ready", "RSS after", "USS after", "PSS after"),
              [(name, start[key]["rss"], start[key]["uss"], mem[key]["rss"], mem[key]["uss"],
                mem[key]["pss"])
               for name, key in (("supervisor", "supervisor"), ("wrapper", "wrapper"),
                                 ("supervisor + wrapper", "supervisor_plus_wrapper"),
                                 ("(ComfyUI simulator)", "comfyui_simulator"))]),
    ]
    if report["crash_to_ready"]:
        timings = report["supervisor_timings"]
        lines += [
            "",
            f"Crash-to-ready (SIGKILL to ComfyUI; supervisor.probe_interval "
            f"{timings['probe_interval']:g} s, supervisor.backoff_initial "
            f"{timings['backoff_initial']:g} s), ms after the kill",
            table(("crash", "/health not 200", "/health 200 again", "first request done",
                   "restarts"),
                  [(i + 1, c["detect_ms"], c["ready_ms"], c["first_request_ms"],
                    c["comfyui_restarts"]) for i, c in enumerate(report["crash_to_ready"])]),
        ]
    targets = report["targets"]
    lines += [
        "",
        f"target: full stack adds <= {ADDED_P50_TARGET_MS:g} ms at p50 ... "
        f"{'met' if targets['added_p50_le_2_5ms'] else 'NOT met'}",
        f"target: supervisor + wrapper RSS <= {RSS_TARGET_MB:g} MB ... "
        f"{'met' if targets['rss_le_80mb'] else 'NOT met'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.perf.stack_latency",
                                     description=__doc__.split("\n\n")[0])
    common_arguments(parser, default_n=200)
    parser.add_argument("--rounds", type=int, default=3, help="back-to-back rounds (default 3)")
    parser.add_argument("--crashes", type=int, default=1,
                        help="ComfyUI crashes to time (default 1; 0 skips it)")
    parser.add_argument("--probe-interval", type=float, default=None,
                        help="SUPERVISOR_PROBE_INTERVAL for the daemon (default: the product's)")
    parser.add_argument("--backoff-initial", type=float, default=None,
                        help="SUPERVISOR_BACKOFF_INITIAL for the daemon (default: the product's)")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the bare-forwarder path (tests/perf/bare_forward.py)")
    args = parser.parse_args(argv)

    def body(workdir: Path) -> dict:
        note(f"starting `comfy-worker run` with the simulator (work folder {workdir})")
        with start_stack(workdir, args) as stack, contextlib.ExitStack() as floor:
            if not args.no_floor:
                stack.floor = floor.enter_context(start_floor(
                    workdir, "the bare forwarder", "tests.perf.bare_forward", "--wrapper-url",
                    stack.wrapper_url))
            return run_bounded(measure(args, stack), args.time_limit)

    return run_script("stack_latency", args, body, render)


if __name__ == "__main__":
    sys.exit(main())
