"""`python -m tests.soak [--seconds N] [--seed S] [--rps R] [--folder DIR] [--json FILE]`.

Starts the stack, sends a steady load through `comfy-worker client load`'s own machinery, injects
the seeded faults, waits for the webhooks to settle, stops everything, checks, prints. Exit 0 when
every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from supervisor.commands.client_cli import Target, run_load
from tests.soak import checks
from tests.soak.faults import Injector, plan
from tests.soak.stack import BUCKET, Moto, TcpProxy, WebhookReceiver, Worker

logger = logging.getLogger("soak")

#: The request sent over and over: a small sampler graph on the simulator (about 0.4 s of work).
PAYLOAD = {"input": {"modifier": "Text2Image",
                     "modifications": {"steps": 8, "width": 64, "height": 64}}}
SETTLE_SECONDS = 90.0


async def _sample_rss(worker: Worker, into: dict[int, dict[str, Any]], stop: asyncio.Event
                      ) -> None:
    """RSS of the daemon and the wrapper every 2 s, per process (a restart makes a new row)."""
    while not stop.is_set():
        pids = {"daemon": worker.process.pid if worker.process else None,
                "wrapper": await worker.child_pid("wrapper")}
        for name, pid in pids.items():
            if not pid:
                continue
            try:
                process = psutil.Process(pid)
                if time.time() - process.create_time() < 5:
                    continue  # still importing: its first figure would flatter the growth
                rss = process.memory_info().rss / 2 ** 20
            except psutil.Error:
                continue
            row = into.setdefault(pid, {"process": name, "pid": pid, "first": rss,
                                        "since": time.monotonic()})
            row["last"] = rss
            row["seconds"] = time.monotonic() - row["since"]
        try:
            await asyncio.wait_for(stop.wait(), 2.0)
        except asyncio.TimeoutError:
            pass


async def _finished_ids(worker: Worker, session: aiohttp.ClientSession, ids: list[str]
                        ) -> list[str]:
    """Request ids the wrapper finished (its result store knows them as final)."""
    finished = []
    for rid in ids:
        try:
            async with session.get(f"http://127.0.0.1:{worker.wrapper_port}/result/{rid}",
                                   timeout=aiohttp.ClientTimeout(total=5)) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            continue
        if response.status != 404 and body.get("status") not in (None, "pending", "processing",
                                                                  "generating", "generated"):
            finished.append(rid)
    return finished


async def soak(seconds: float, seed: int, rps: float, folder: Path, gap: float = 8.0
               ) -> checks.SoakReport:
    secret = "soak-webhook-secret"
    moto = Moto(folder)
    await asyncio.to_thread(moto.start)
    proxy = TcpProxy(moto.port)
    await proxy.up()
    hooks = WebhookReceiver(secret)
    await hooks.up()
    worker = Worker(folder / "worker", proxy.url, hooks.url, secret)
    report = checks.SoakReport(seed=seed, seconds=seconds, requests=0)
    async with aiohttp.ClientSession() as session:
        try:
            worker.start()
            if not await worker.wait_ready(session, 120):
                raise RuntimeError(f"the worker did not become ready; see {folder}/worker")
            injector = Injector(worker, proxy, hooks, session)
            stop_sampling = asyncio.Event()
            rss: dict[int, dict[str, Any]] = {}
            sampler = asyncio.create_task(_sample_rss(worker, rss, stop_sampling))
            count = max(1, int(seconds * rps))
            payload = {"input": {**PAYLOAD["input"], "request_id": f"soak{seed}"}}
            started = time.monotonic()
            faults = asyncio.create_task(injector.run(plan(seed, seconds, gap), started))
            load = await run_load(Target(url=worker.url, token=worker.token), payload,
                                  count=count, rps=rps, concurrency=8, timeout=180)
            await faults
            ids = [f"soak{seed}-{i}" for i in range(count)]
            # Pair each outcome with its request id (outcomes arrive in finishing order).
            outcomes = _pair(load.outcomes, ids)
            report.requests = count
            report.seconds = time.monotonic() - started
            finished = await _finished_ids(worker, session, ids)
            deadline = time.monotonic() + SETTLE_SECONDS
            while time.monotonic() < deadline:
                good = {h.request_id for h in hooks.hits if h.signature_ok}
                if all(rid in good for rid in finished):
                    break
                await asyncio.sleep(0.5)
            stop_sampling.set()
            await sampler
            report.rss = [{**row, "first": round(row["first"], 1), "last": round(row["last"], 1),
                           "seconds": round(row["seconds"], 1)} for row in rss.values()
                          if "last" in row]
            report.faults = [vars(f) for f in injector.done]
            report.stranger_prompts = injector.stranger_prompts
            checks.check_answers(report, outcomes)
            await asyncio.to_thread(checks.check_outputs, report, outcomes, moto.client(), BUCKET)
            checks.check_webhooks(report, finished, hooks.hits)
        finally:
            await asyncio.to_thread(worker.terminate)
            await hooks.close()
            await proxy.down()
            await asyncio.to_thread(moto.stop)
    await asyncio.sleep(1.0)
    checks.check_half_written(report, folder / "worker")
    report.orphans = checks.find_orphans(str(folder / "worker"))
    return report


def _pair(outcomes: list[Any], ids: list[str]) -> list[tuple[str, Any]]:
    """run_load keeps outcomes in finishing order; each body names its request where it can."""
    paired: list[tuple[str, Any]] = []
    unnamed = []
    left = set(ids)
    for outcome in outcomes:
        rid = outcome.body.get("id") if isinstance(outcome.body, dict) else None
        if rid in left:
            left.discard(rid)
            paired.append((rid, outcome))
        else:
            unnamed.append(outcome)
    for rid, outcome in zip(sorted(left), unnamed):
        paired.append((rid, outcome))
    return paired


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rps", type=float, default=2.0)
    parser.add_argument("--gap", type=float, default=8.0, help="Seconds between faults.")
    parser.add_argument("--folder", type=Path, default=None,
                        help="Keep the stack's files here (default: a temporary folder).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the report here.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="soak: %(message)s")
    folder = args.folder or Path(tempfile.mkdtemp(prefix="comfy-worker-soak-"))
    folder.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(soak(args.seconds, args.seed, args.rps, folder, args.gap))
    print(checks.render(report))
    if args.json:
        checks.dump(report, args.json)
    if args.folder is None and not report.failures:
        shutil.rmtree(folder, ignore_errors=True)
    elif report.failures:
        print(f"files kept in {folder}", file=sys.stderr)
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
