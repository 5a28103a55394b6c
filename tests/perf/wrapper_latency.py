"""Latency the API wrapper adds, and whether it keeps ComfyUI busy.

    .venv/bin/python -m tests.perf.wrapper_latency [--n 200] [--concurrent 20] [--json]

Starts the ComfyUI simulator and a `comfy-worker api` subprocess pointed at it, then:

1. *sequential*: ``--n`` tiny workflows (EmptyImage 64x64 -> SaveImage, a new colour each time so
   that nothing is served from ComfyUI's cache) through ``POST /generate/sync`` on the wrapper and
   the same number with ``ComfyClient.run_prompt`` straight on ComfyUI, interleaved so that both
   see the same machine; p50/p90/mean of each and what the wrapper adds. Beside them (unless
   ``--no-floor``) the same through a bare aiohttp proxy around ``run_prompt``
   (``tests/perf/bare_proxy.py``): the cost of one HTTP hop in Python on this machine, which
   the wrapper cannot go below.
2. *back-to-back*: ``--concurrent`` requests at once through the wrapper, ``--rounds`` times: the
   total time against ``concurrent x`` the sequential median, and the idle time ComfyUI had
   between one prompt's end and the next one's start, read from ComfyUI's own timestamps
   (``execution_start`` / ``execution_success`` in ``/history``, milliseconds). For comparison,
   the same number queued straight into ComfyUI shows its own gap with a full queue.

Targets (from the issues): the wrapper adds <= 1.5 ms at p50; ComfyUI is never idle between queued
jobs (here: the gap through the wrapper is no larger than ComfyUI's own gap + 1 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp

from api.comfy import ComfyClient, PromptStatus
from simulator.testing import SimulatorStartError, start_simulator
from tests.perf.common import (
    Counter,
    PerfError,
    Summary,
    back_to_back_round,
    common_arguments,
    cpu_per_request,
    gap_figures,
    note,
    percentile,
    post_generate,
    run_bounded,
    run_script,
    run_window,
    run_windows,
    start_floor,
    start_wrapper,
    table,
    timed,
    tiny_graph,
)

ADDED_P50_TARGET_MS = 1.5
IDLE_TOLERANCE_MS = 1.0

Call = Callable[[], Awaitable[Any]]


async def _direct(client: ComfyClient, graph: dict[str, Any]) -> Any:
    result = await client.run_prompt(graph)
    if result.status is not PromptStatus.SUCCESS or not result.outputs:
        raise PerfError(f"ComfyUI did not complete prompt {result.prompt_id}: {result.status}")
    return result


async def sequential(n: int, direct: Call, wrapped: Call, floor: Call | None = None
                     ) -> dict[str, Any]:
    """`floor`, when given, is a bare HTTP hop in front of ComfyUI (tests/perf/bare_proxy.py):
    what the wrapper adds beyond it is the wrapper's own work."""
    note(f"sequential: {n} requests per path, interleaved")
    paths: dict[str, Call] = {"direct": direct, "wrapper": wrapped}
    if floor is not None:
        paths["floor"] = floor
    samples: dict[str, list[float]] = {name: [] for name in paths}
    paired_ms: list[float] = []
    comfy_run_ms: list[float] = []
    names = list(paths)
    for i in range(n):
        # Rotate the order so that no path always runs right after the same other one.
        took: dict[str, float] = {}
        for name in names[i % len(names):] + names[:i % len(names)]:
            took[name], answer = await timed(paths[name])
            if name == "direct":
                result = answer
        for name, seconds in took.items():
            samples[name].append(seconds)
        paired_ms.append((took["wrapper"] - took["direct"]) * 1000)
        window = run_window(result.prompt_id, result.history or {})
        if window is not None:
            comfy_run_ms.append(float(window.end_ms - window.start_ms))
    summaries = {name: Summary.of_seconds(values) for name, values in samples.items()}
    direct_summary, wrapper_summary = summaries["direct"], summaries["wrapper"]
    report = {
        "ms": {**{name: s.to_json() for name, s in summaries.items()},
               "comfyui_run": Summary.of_ms(comfy_run_ms).to_json()},
        "added_ms": {"p50": round(wrapper_summary.p50 - direct_summary.p50, 3),
                     "p90": round(wrapper_summary.p90 - direct_summary.p90, 3),
                     "mean": round(wrapper_summary.mean - direct_summary.mean, 3),
                     "paired_median": round(percentile(paired_ms, 50), 3)},
    }
    if "floor" in summaries:
        report["floor_added_ms"] = {"p50": round(summaries["floor"].p50 - direct_summary.p50, 3)}
    return report


async def comfyui_alone(client: ComfyClient, session: aiohttp.ClientSession, comfy_url: str,
                        count: int, counter: Counter) -> dict[str, Any]:
    """ComfyUI's own gap between prompts when its queue is full: the floor to compare with."""
    note(f"baseline: {count} prompts queued straight into ComfyUI")
    submissions = await asyncio.gather(*(client.submit(tiny_graph(counter.next()))
                                         for _ in range(count)))
    for submission in submissions:
        await client.wait(submission.prompt_id)
    return gap_figures(await run_windows(session, comfy_url, [s.prompt_id for s in submissions]))


async def measure(args: argparse.Namespace, comfy_url: str, output_dir: Path,
                  wrapper_url: str, pids: dict[str, int], floor_url: str | None = None
                  ) -> dict[str, Any]:
    counter = Counter()
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session, \
            ComfyClient(comfy_url, output_dir=output_dir) as client:

        async def direct() -> Any:
            return await _direct(client, tiny_graph(counter.next()))

        async def wrapped() -> Any:
            return await post_generate(session, wrapper_url, tiny_graph(counter.next()))

        async def floor() -> Any:
            assert floor_url is not None
            return await post_generate(session, floor_url, tiny_graph(counter.next()))

        note(f"warm-up: {args.warmup} requests per path")
        for _ in range(args.warmup):
            await direct()
            await wrapped()
            if floor_url:
                await floor()
        seq = await sequential(args.n, direct, wrapped, floor if floor_url else None)

        cpu: dict[str, dict[str, float]] = {}
        if args.cpu_n:
            note(f"CPU time: {args.cpu_n} requests per path, in blocks")
            cpu = await cpu_per_request({"direct": direct, "wrapper": wrapped}, args.cpu_n, pids)

        single_ms = seq["ms"]["wrapper"]["p50"]
        rounds = []
        for r in range(args.rounds):
            note(f"back-to-back: {args.concurrent} requests at once through the wrapper "
                 f"(round {r + 1}/{args.rounds})")
            figures = await back_to_back_round(session, wrapper_url, comfy_url, args.concurrent,
                                               counter)
            rounds.append({"total_ms": figures["total_ms"],
                           "sequential_ms": round(args.concurrent * single_ms, 2),
                           "ratio": round(figures["total_ms"] / (args.concurrent * single_ms), 3),
                           **figures})
        alone = await comfyui_alone(client, session, comfy_url, args.concurrent, counter)

    added_p50 = seq["added_ms"]["p50"]
    gap_means = [r["gap_mean_ms"] for r in rounds if r["gap_mean_ms"] is not None]
    wrapper_gap_mean = sum(gap_means) / len(gap_means) if gap_means else 0.0
    return {
        "n": args.n,
        "sequential_ms": seq["ms"],
        "added_ms": seq["added_ms"],
        "floor_added_ms": seq.get("floor_added_ms"),
        "cpu_ms_per_request": cpu,
        "back_to_back": {"concurrent": args.concurrent, "single_p50_ms": single_ms,
                         "rounds": rounds},
        "comfyui_alone": alone,
        "targets": {"added_p50_le_1_5ms": added_p50 <= ADDED_P50_TARGET_MS,
                    "comfyui_never_idle":
                        wrapper_gap_mean <= (alone["gap_mean_ms"] or 0.0) + IDLE_TOLERANCE_MS},
    }


def render(report: dict[str, Any]) -> str:
    seq = report["sequential_ms"]
    added = report["added_ms"]
    b2b = report["back_to_back"]
    alone = report["comfyui_alone"]
    targets = report["targets"]
    cols = ("p50", "p90", "mean", "min", "max")
    rows = [("direct ComfyClient", *(seq["direct"][c] for c in cols)),
            ("through the wrapper", *(seq["wrapper"][c] for c in cols))]
    if "floor" in seq:
        rows.append(("through a bare proxy", *(seq["floor"][c] for c in cols)))
    rows.append(("ComfyUI run itself", *(seq["comfyui_run"][c] for c in cols)))
    lines = [
        f"Sequential tiny workflow (EmptyImage 64x64 -> SaveImage), n={report['n']} per path, ms",
        table(("path", *cols), rows),
        f"wrapper adds: p50 {added['p50']:+.2f} ms, p90 {added['p90']:+.2f} ms, "
        f"mean {added['mean']:+.2f} ms "
        f"(median of paired differences {added['paired_median']:+.2f} ms)",
    ]
    if report.get("floor_added_ms"):
        lines.append(f"a bare aiohttp proxy around ComfyClient.run_prompt (one HTTP hop, nothing "
                     f"else) adds: p50 {report['floor_added_ms']['p50']:+.2f} ms")
    cpu = report["cpu_ms_per_request"]
    if cpu:
        procs = ("client", "wrapper", "comfyui")
        extra = (cpu["wrapper"]["client"] + cpu["wrapper"]["wrapper"]) - \
            (cpu["direct"]["client"] + cpu["direct"]["wrapper"])
        lines += [
            "",
            "CPU time per request, ms (client = this script, which runs the direct ComfyClient)",
            table(("path", *procs, "total"),
                  [(name, *(cpu[name][p] for p in procs), sum(cpu[name][p] for p in procs))
                   for name in ("direct", "wrapper")]),
            f"the wrapper path costs {extra:+.2f} ms more CPU (client + wrapper) "
            "than the direct one",
        ]
    lines += [
        "",
        f"Back-to-back: {b2b['concurrent']} requests at once through the wrapper "
        f"(single-request p50 {b2b['single_p50_ms']:.2f} ms)",
        table(("round", "total ms", f"{b2b['concurrent']} x single", "ratio",
               "ComfyUI idle gap mean", "p50", "max", "ComfyUI busy %"),
              [(i + 1, r["total_ms"], r["sequential_ms"], r["ratio"], r["gap_mean_ms"],
                r["gap_p50_ms"], r["gap_max_ms"], r["comfyui_busy_pct"])
               for i, r in enumerate(b2b["rounds"])]),
        f"ComfyUI alone with {b2b['concurrent']} queued: "
        f"idle gap mean {alone['gap_mean_ms']} ms, max {alone['gap_max_ms']} ms, "
        f"busy {alone['comfyui_busy_pct']} % (timestamps have 1 ms resolution)",
        "",
        f"target: wrapper adds <= {ADDED_P50_TARGET_MS:g} ms at p50 ... "
        f"{'met' if targets['added_p50_le_1_5ms'] else 'NOT met'}",
        "target: ComfyUI never idle between queued jobs "
        f"(gap <= its own + {IDLE_TOLERANCE_MS:g} ms) ... "
        f"{'met' if targets['comfyui_never_idle'] else 'NOT met'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.perf.wrapper_latency",
                                     description=__doc__.split("\n\n")[0])
    common_arguments(parser, default_n=200)
    parser.add_argument("--rounds", type=int, default=3, help="back-to-back rounds (default 3)")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the bare-proxy path (tests/perf/bare_proxy.py)")
    args = parser.parse_args(argv)

    def body(workdir: Path) -> dict:
        note(f"starting the simulator and the wrapper (work folder {workdir})")
        with start_simulator(workdir, "--step-seconds", str(args.step_seconds)) as sim, \
                start_wrapper(workdir, sim.url, sim.output_dir) as wrapper, \
                contextlib.ExitStack() as floor:
            floor_url = None if args.no_floor else floor.enter_context(
                start_floor(workdir, "the bare proxy", "tests.perf.bare_proxy", "--comfy-url",
                            sim.url)).url
            pids = {"wrapper": wrapper.process.pid, "comfyui": sim.process.pid}
            return run_bounded(measure(args, sim.url, sim.output_dir, wrapper.url, pids,
                                       floor_url), args.time_limit)

    return run_script("wrapper_latency", args, body, render, (SimulatorStartError,))


if __name__ == "__main__":
    sys.exit(main())
