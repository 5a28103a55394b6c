"""Bytes per second the daemon's ComfyUI watcher reads while a large workflow is queued.

    .venv/bin/python -m tests.perf.watch_bytes [--seconds 10] [--nodes 400] [--pending 3] [--json]

The watcher (supervisor/instances/watch.py) learns each second which prompt runs and how many
wait. Through `GET /queue` that answer carries every queued prompt's whole graph; through the
newest ComfyUI's `GET /api/jobs?status=in_progress,pending` it carries ids and states. This
script starts the simulator, puts a byte-counting TCP relay in front of it, queues one running
and ``--pending`` waiting copies of a large graph (a sampler graph plus ``--nodes`` primitive
nodes with 400-character strings, about what a big real workflow weighs) and runs the watcher
against the relay for ``--seconds``, three ways:

* newest ComfyUI (0.38.1 mode), the watcher asking which API to use (it picks the jobs API);
* the same ComfyUI, the watcher held to `GET /queue` (what it did before);
* ComfyUI 0.3.64 mode, the watcher asking (it has no jobs API: `GET /queue`).

The relay counts what ComfyUI sends to the watcher: HTTP answers and WebSocket frames together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from api.comfy import ComfyClient
from simulator.testing import start_simulator
from supervisor.instances.watch import ComfyWatch
from tests.support.workflows import sampler_graph


class CountingRelay:
    """A TCP relay to ``port`` that counts the bytes going back to its clients."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.received = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            try:
                while chunk := await src.read(65536):
                    if count:
                        self.received += len(chunk)
                    dst.write(chunk)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))


def large_graph(nodes: int, seed: int) -> dict[str, Any]:
    graph = sampler_graph(10_000)   # hours at 1 s a step: one prompt stays running
    graph["3"]["inputs"]["seed"] = seed
    for n in range(nodes):
        graph[str(1000 + n)] = {"class_type": "PrimitiveString",
                                "inputs": {"value": f"node {n}: " + "lorem ipsum " * 33}}
    return graph


def queue_prompts(url: str, count: int, nodes: int) -> int:
    size = 0
    for n in range(count):
        body = json.dumps({"prompt": large_graph(nodes, n), "client_id": "perf-watch"}).encode()
        size = len(body)
        request = urllib.request.Request(url + "/prompt", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()
    return size


async def watch_for(port: int, seconds: float, jobs_api: bool | None) -> dict[str, Any]:
    relay = CountingRelay(port)
    relay_port = await relay.start()
    client = ComfyClient(f"http://127.0.0.1:{relay_port}")
    watch = ComfyWatch(client, output_at=lambda: None, jobs_api=jobs_api)
    watch.start()
    try:
        await asyncio.sleep(2.0)   # the first readings (and the capabilities) are not counted
        start, began = relay.received, time.monotonic()
        await asyncio.sleep(seconds)
        rate = (relay.received - start) / (time.monotonic() - began)
        activity = watch.activity()
        return {"bytes_per_s": round(rate), "source": watch.source,
                "running": activity.running is not None, "pending": activity.pending}
    finally:
        await watch.stop()
        await client.close()
        await relay.close()


def measure(api_version: str, jobs_api: bool | None, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, \
            start_simulator(Path(tmp), "--step-seconds", "1", api_version=api_version) as sim:
        size = queue_prompts(sim.url, 1 + args.pending, args.nodes)
        result = asyncio.run(watch_for(sim.port, args.seconds, jobs_api))
        return {"comfyui": api_version, "watcher": "asks" if jobs_api is None else "GET /queue",
                "graph_bytes": size, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--nodes", type=int, default=400, help="extra nodes per graph")
    parser.add_argument("--pending", type=int, default=3, help="prompts waiting behind the running one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [measure("0.38.1", False, args), measure("0.38.1", None, args),
            measure("0.3.64", None, args)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"one running and {args.pending} waiting prompts of {rows[0]['graph_bytes'] / 1024:.0f} KiB "
          f"each; watcher polling once a second for {args.seconds:g} s")
    print(f"{'ComfyUI':<9} {'watcher':<11} {'reads from':<15} {'bytes/s':>10}  seen")
    for row in rows:
        print(f"{row['comfyui']:<9} {row['watcher']:<11} {row['source']:<15} "
              f"{row['bytes_per_s']:>10,}  running={row['running']} pending={row['pending']}")
    before, after = rows[0]["bytes_per_s"], rows[1]["bytes_per_s"]
    if after:
        print(f"jobs API: {before / after:.0f}x fewer bytes than GET /queue on the same ComfyUI")


if __name__ == "__main__":
    main()
