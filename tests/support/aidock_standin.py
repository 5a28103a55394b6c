"""A stand-in for the ai-dock comfyui-api-wrapper, written from its observed formats.

It lets the tests run the daemon with "someone else's wrapper" as `[wrapper]`: nothing here shares
code with this project's wrapper (`api/`), and it offers only what that wrapper does, as noted in
/work/shared/AIDOCK_WRAPPER.md:

* `GET /health`: `{"status": "healthy", "queues", "backends_healthy", "backends": [...]}`, no
  progress or stall information;
* `GET /queue-info`: the three queue sizes;
* `POST /generate/sync`: the result object (`id`, `status`, `message`, `comfyui_response`,
  `output`, `timings`); outputs copied to `<COMFYUI_INSTALL_PATH>/output/<request id>/`;
  HTTP 200 completed, 499 cancelled, 502 ComfyUI unreachable, 500 any other failure;
* `POST /generate/stream`: plain `data:` events (no `event:` names) with a `status` each, the
  last one `final_result` carrying the result;
* no step progress anywhere: ComfyUI sends its `progress` frames to this process only.

It submits with its own `client_id` and opens its WebSocket *after* posting, as the real one does.
Only `workflow_json` requests are taken (a modifier gets a 400). Run it as
`python -m tests.support.aidock_standin --port N` with `COMFYUI_API_BASE` and `COMFYUI_INSTALL_PATH`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web


def _now_ms() -> int:
    return int(time.time() * 1000)


class StandIn:
    def __init__(self, comfy: str, install: Path) -> None:
        self.comfy = comfy.rstrip("/")
        self.install = install
        self.client_id = f"worker_0_{time.time()}"
        self.lock = asyncio.Lock()  # one generation at a time, like its single generation worker
        self.waiting = 0
        self.session: aiohttp.ClientSession | None = None

    # --- ComfyUI ----------------------------------------------------------------------------
    async def _generate(self, request_id: str, workflow: dict[str, Any]) -> tuple[int, dict]:
        assert self.session is not None
        queued = _now_ms()
        result: dict[str, Any] = {"id": request_id, "status": "processing", "message": "",
                                  "comfyui_response": {}, "output": [], "timings": {}}
        self.waiting += 1
        try:
            async with self.lock:
                self.waiting -= 1
                started = _now_ms()
                try:
                    async with self.session.post(self.comfy + "/prompt", json={
                            "prompt": workflow, "client_id": self.client_id}) as response:
                        body = await response.json(content_type=None)
                        if response.status != 200:
                            raise RuntimeError(f"ComfyUI API error: {json.dumps(body)}")
                    prompt_id = body["prompt_id"]
                    entry = await self._wait(prompt_id)
                except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                    result.update(status="failed",
                                  message=f"Generation failed: ComfyUI unreachable ({exc})")
                    return 502, result
                except Exception as exc:  # the real one maps every other failure to 500
                    result.update(status="failed", message=f"Generation failed: {exc}")
                    return 500, result
                generated = _now_ms()
        except asyncio.CancelledError:
            raise
        result["comfyui_response"] = {prompt_id: entry}
        status = (entry.get("status") or {}).get("status_str")
        if status != "success":
            result.update(status="failed", message="Generation failed: ComfyUI reported an error")
            return 500, result
        result["output"] = await asyncio.to_thread(self._copy_outputs, request_id, entry)
        done = _now_ms()
        result.update(status="completed", message="Processing complete.", timings={
            "queued_at_ms": queued, "preprocess_ms": 0, "generation_ms": generated - started,
            "postprocess_ms": done - generated, "completed_at_ms": done,
            "total_ms": done - queued})
        return 200, result

    async def _wait(self, prompt_id: str) -> dict[str, Any]:
        """Follow the WebSocket opened after posting; also read the history each second."""
        assert self.session is not None
        async with self.session.ws_connect(self.comfy + "/ws",
                                           params={"clientId": self.client_id}) as ws:
            while True:
                entry = await self._history(prompt_id)
                if entry is not None:
                    return entry
                try:
                    message = await ws.receive(timeout=1.0)
                except asyncio.TimeoutError:
                    continue
                if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    raise aiohttp.ClientConnectionError("ComfyUI's WebSocket closed")

    async def _history(self, prompt_id: str) -> dict[str, Any] | None:
        assert self.session is not None
        async with self.session.get(f"{self.comfy}/history/{prompt_id}") as response:
            body = await response.json(content_type=None)
        entry = body.get(prompt_id) if isinstance(body, dict) else None
        if not isinstance(entry, dict):
            return None
        status = entry.get("status") or {}
        return entry if status.get("completed") or status.get("status_str") else None

    def _copy_outputs(self, request_id: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
        out_root = self.install / "output"
        target = out_root / request_id
        files = []
        for node_id, node_output in (entry.get("outputs") or {}).items():
            for kind, items in (node_output or {}).items():
                for item in items if isinstance(items, list) else []:
                    if not isinstance(item, dict) or item.get("type") != "output":
                        continue
                    source = out_root / (item.get("subfolder") or "") / item["filename"]
                    local = target / item["filename"]
                    if source.is_file():
                        target.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(source, local)
                    files.append({"filename": item["filename"], "local_path": str(local),
                                  "type": "output", "subfolder": item.get("subfolder") or "",
                                  "node_id": str(node_id), "output_type": kind})
        return files

    # --- routes -----------------------------------------------------------------------------
    async def _request(self, request: web.Request) -> tuple[str, dict[str, Any]] | web.Response:
        try:
            body = await request.json()
            data = body["input"]
            workflow = data["workflow_json"]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"detail": "this stand-in takes input.workflow_json only"},
                                     status=400)
        return str(data.get("request_id") or uuid.uuid4()), workflow

    async def sync(self, request: web.Request) -> web.Response:
        parsed = await self._request(request)
        if isinstance(parsed, web.Response):
            return parsed
        status, result = await self._generate(*parsed)
        return web.json_response(result, status=status)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        parsed = await self._request(request)
        if isinstance(parsed, web.Response):
            return parsed
        request_id, workflow = parsed
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(event: dict[str, Any]) -> None:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())

        began = time.monotonic()
        await send({"request_id": request_id, "status": "queued", "message": "Request queued",
                    "timestamp": time.time()})
        task = asyncio.create_task(self._generate(request_id, workflow))
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            if not task.done():
                await send({"request_id": request_id, "status": "processing",
                            "message": "Processing", "timestamp": time.time(),
                            "elapsed_time": time.monotonic() - began,
                            "queue_position": {"current_queue": "generation", "position": 0,
                                               "queue_size": self.waiting,
                                               "estimated_wait_time": 0}})
        _status, result = task.result()
        await send({"request_id": request_id, "status": "final_result", "result": result,
                    "elapsed_time": time.monotonic() - began})
        return response

    async def health(self, request: web.Request) -> web.Response:
        assert self.session is not None
        backend: dict[str, Any] = {"base": self.comfy, "http_ok": False, "websocket_ok": False}
        # Like the real one, /health asks ComfyUI over HTTP (up to 5 s) and then over its
        # WebSocket (up to 2 s), so a hung ComfyUI makes this answer slow, not wrong.
        try:
            async with self.session.get(self.comfy + "/system_stats",
                                        timeout=aiohttp.ClientTimeout(total=5)) as response:
                backend["http_ok"] = response.status == 200
                backend["system_stats"] = await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            pass
        try:
            async with self.session.ws_connect(self.comfy + "/ws",
                                               timeout=aiohttp.ClientWSTimeout(ws_close=2),
                                               receive_timeout=2) as ws:
                backend["websocket_ok"] = not ws.closed
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            pass
        healthy = backend["http_ok"]
        return web.json_response({
            "status": "healthy" if healthy else "unhealthy", "cache_type": "memory",
            "queues": {"preprocess": 0, "generation": self.waiting, "postprocess": 0},
            "backends_healthy": f"{int(healthy)}/1",
            "gpu": {"unrecoverable": False, "reason": ""}, "backends": [backend]},
            status=200 if healthy else 503)

    async def queue_info(self, request: web.Request) -> web.Response:
        return web.json_response({"preprocess_queue_size": 0,
                                  "generation_queue_size": self.waiting,
                                  "postprocess_queue_size": 0})


async def _serve(port: int) -> None:
    comfy = os.environ.get("COMFYUI_API_BASE") or os.environ.get("COMFYUI_URL")
    standin = StandIn(comfy or "http://127.0.0.1:8188",
                      Path(os.environ.get("COMFYUI_INSTALL_PATH", "/opt/ComfyUI")))
    standin.session = aiohttp.ClientSession()
    app = web.Application()
    app.router.add_post("/generate/sync", standin.sync)
    app.router.add_post("/generate/stream", standin.stream)
    app.router.add_get("/health", standin.health)
    app.router.add_get("/queue-info", standin.queue_info)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"ai-dock stand-in on 127.0.0.1:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await standin.session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(_serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
