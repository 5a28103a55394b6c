"""ComfyUI's HTTP and WebSocket API, served by aiohttp over the simulated executor.

Routes, status codes and bodies follow ComfyUI 0.3.64's ``server.py``; every route is also
served under ``/api``. Two simulator-only routes, ``GET/POST /__sim__/knobs``, read and change
the knobs. What is *not* simulated: the web UI, ``/upload/mask``, ``/view``'s ``preview`` and
``channel`` conversions (the stored file is returned as is), users, models management,
internal routes and binary preview frames.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import mimetypes
import os
import platform
import sys
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import aiohttp
import psutil
from aiohttp import web

from simulator import COMFYUI_VERSION
from simulator.errors import KnobError
from simulator.execution import ExecutionOutcome, PromptExecutor
from simulator.knobs import DeviceType
from simulator.nodes import NODE_CLASSES, NodeEnv, node_info
from simulator.prompt_queue import ExecutionStatus, PromptQueue, QueueItem
from simulator.validation import PromptValidator

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# ComfyUI's frontend/template versions at 0.3.64, reported by /system_stats.
_FRONTEND_VERSION = "1.27.10"
_TEMPLATES_VERSION = "0.1.94"
_MODEL_FOLDERS = ["checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
                  "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models",
                  "latent_upscale_models", "hypernetworks", "photomaker", "classifiers", "model_patches",
                  "audio_encoders"]


@dataclass
class ServerOptions:
    max_upload_size_mb: float = 100
    enable_cors_header: str | None = None
    cache_enabled: bool = True


class SimulatorServer:
    """Holds the sockets, the queue and the executor, and answers the routes."""

    def __init__(self, env: NodeEnv, options: ServerOptions) -> None:
        self.env = env
        self.options = options
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.sockets_metadata: dict[str, dict[str, Any]] = {}
        self.number = 0
        self._messages: asyncio.Queue[tuple[str, dict[str, Any], str | None]] = asyncio.Queue()
        self.queue = PromptQueue(self.queue_updated)
        self.executor = PromptExecutor(env, self, cache_enabled=options.cache_enabled)
        self.validator = PromptValidator(env)
        self.app = self._build_app()

    # --- events ----------------------------------------------------------------------------

    def send_sync(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        """Queue an event; the publish loop writes events in the order they were queued."""
        self._messages.put_nowait((event, data, sid))

    async def drain(self) -> None:
        await self._messages.join()

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.queue.tasks_remaining()}}

    def queue_updated(self) -> None:
        self.send_sync("status", {"status": self.queue_info()})

    async def send_json(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        message = {"type": event, "data": data}
        targets = list(self.sockets.values()) if sid is None else [self.sockets[sid]] if sid in self.sockets else []
        for ws in targets:
            try:
                await ws.send_json(message)
            except (aiohttp.ClientError, ConnectionError) as err:
                logger.warning("send error: %s", err)

    async def publish_loop(self) -> None:
        while True:
            event, data, sid = await self._messages.get()
            try:
                await self.send_json(event, data, sid)
            except Exception:
                logger.exception("failed to publish %s", event)
            finally:
                self._messages.task_done()

    async def prompt_worker(self) -> None:
        """Run queued prompts one at a time, in queue order."""
        while True:
            got = await self.queue.get()
            if got is not None:
                item, task_id = got
                started = time.perf_counter()
                try:
                    outcome = await self.executor.execute(item.prompt, item.prompt_id, item.extra_data,
                                                          item.outputs_to_execute)
                except Exception:  # a simulator bug must not wedge the queue
                    logger.exception("simulator error while executing prompt %s", item.prompt_id)
                    outcome = ExecutionOutcome(False, {"outputs": {}, "meta": {}}, [])
                self.queue.task_done(task_id, outcome.history_result, ExecutionStatus(
                    "success" if outcome.success else "error", outcome.success, outcome.messages))
                if self.executor.client_id is not None:
                    self.send_sync("executing", {"node": None, "prompt_id": item.prompt_id}, self.executor.client_id)
                logger.info("Prompt executed in %.2f seconds", time.perf_counter() - started)
            flags = self.queue.take_flags()
            if flags.get("free_memory"):
                self.executor.reset_caches()

    # --- app -------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        middlewares = [_cors_middleware(self.options.enable_cors_header)] if self.options.enable_cors_header \
            else [_origin_only_middleware]
        app = web.Application(client_max_size=round(self.options.max_upload_size_mb * 1024 * 1024),
                              middlewares=middlewares)
        app[SERVER_KEY] = self
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/ws", self.websocket),
            ("GET", "/", self.root),
            ("GET", "/embeddings", self.embeddings),
            ("GET", "/models", self.model_folders),
            ("GET", "/models/{folder}", self.models),
            ("GET", "/extensions", self.extensions),
            ("POST", "/upload/image", self.upload_image),
            ("GET", "/view", self.view),
            ("GET", "/system_stats", self.system_stats),
            ("GET", "/features", self.features),
            ("GET", "/prompt", self.get_prompt),
            ("GET", "/object_info", self.object_info),
            ("GET", "/object_info/{node_class}", self.object_info_node),
            ("GET", "/history", self.get_history),
            ("GET", "/history/{prompt_id}", self.get_history_item),
            ("GET", "/queue", self.get_queue),
            ("POST", "/prompt", self.post_prompt),
            ("POST", "/queue", self.post_queue),
            ("POST", "/interrupt", self.post_interrupt),
            ("POST", "/free", self.post_free),
            ("POST", "/history", self.post_history),
        ]
        # ComfyUI registers the /api copies first, then the plain paths.
        app.router.add_routes([web.route(m, "/api" + p, h) for m, p, h in routes if p != "/"])
        app.router.add_routes([web.route(m, p, h) for m, p, h in routes])
        app.router.add_get("/__sim__/knobs", self.get_knobs)
        app.router.add_post("/__sim__/knobs", self.post_knobs)
        return app

    # --- WebSocket -------------------------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId", "")
        if sid:
            # Like ComfyUI, a reconnect with the same id replaces the entry; when the older
            # socket then closes, its cleanup removes the newer one too.
            self.sockets.pop(sid, None)
        else:
            sid = uuid.uuid4().hex
        self.sockets[sid] = ws
        self.sockets_metadata[sid] = {"feature_flags": {}}
        try:
            await self.send_json("status", {"status": self.queue_info(), "sid": sid}, sid)
            if self.executor.client_id == sid and self.executor.last_node_id is not None:
                await self.send_json("executing", {"node": self.executor.last_node_id}, sid)
            first_message = True
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.ERROR:
                    logger.warning("ws connection closed with exception %s", ws.exception())
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    try:
                        data = json.loads(msg.data)
                        if first_message and isinstance(data, dict) and data.get("type") == "feature_flags":
                            self.sockets_metadata[sid]["feature_flags"] = data.get("data", {})
                            await self.send_json("feature_flags", self._server_features(), sid)
                        first_message = False
                    except json.JSONDecodeError:
                        logger.warning("Invalid JSON received from client %s: %s", sid, msg.data)
        finally:
            self.sockets.pop(sid, None)
            self.sockets_metadata.pop(sid, None)
        return ws

    def _server_features(self) -> dict[str, Any]:
        size = self.options.max_upload_size_mb * 1024 * 1024
        return {"supports_preview_metadata": True, "max_upload_size": int(size) if size == int(size) else size}

    # --- small routes ----------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="<!doctype html><title>ComfyUI simulator</title>"
                                 "<p>ComfyUI simulator: API only, no web UI.</p>",
                            content_type="text/html", headers={"Cache-Control": "no-cache"})

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([])

    async def model_folders(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(_MODEL_FOLDERS)

    async def models(self, request: web.Request) -> web.StreamResponse:
        folder = request.match_info["folder"]
        if folder not in _MODEL_FOLDERS:
            return web.Response(status=404)
        return web.json_response(self.env.checkpoint_names() if folder == "checkpoints" else [])

    async def extensions(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([])

    async def features(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._server_features())

    async def get_prompt(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.queue_info())

    async def object_info(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({name: node_info(cls, self.env) for name, cls in NODE_CLASSES.items()})

    async def object_info_node(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["node_class"]
        cls = NODE_CLASSES.get(name)
        return web.json_response({name: node_info(cls, self.env)} if cls is not None else {})

    async def system_stats(self, request: web.Request) -> web.StreamResponse:
        knobs = self.env.knobs
        memory = psutil.virtual_memory()
        if knobs.device_type is DeviceType.CPU:
            device = {"name": knobs.resolved_device_name(), "type": "cpu", "index": None,
                      "vram_total": memory.total, "vram_free": memory.available,
                      "torch_vram_total": memory.total, "torch_vram_free": memory.available}
        else:
            total = knobs.vram_total_mb * 1024 * 1024
            reserved = 0
            device = {"name": knobs.resolved_device_name(), "type": "cuda", "index": 0,
                      "vram_total": total, "vram_free": total - 512 * 1024 * 1024,
                      "torch_vram_total": reserved, "torch_vram_free": reserved}
        return web.json_response({
            "system": {
                "os": os.name,
                "ram_total": memory.total,
                "ram_free": memory.available,
                "comfyui_version": COMFYUI_VERSION,
                "required_frontend_version": _FRONTEND_VERSION,
                "installed_templates_version": _TEMPLATES_VERSION,
                "required_templates_version": _TEMPLATES_VERSION,
                "python_version": sys.version,
                "pytorch_version": "2.8.0+sim",
                "embedded_python": False,
                "argv": sys.argv,
                "simulator": True,
                "platform": platform.platform(),
            },
            "devices": [device],
        })

    # --- files -----------------------------------------------------------------------------

    async def upload_image(self, request: web.Request) -> web.StreamResponse:
        post = await request.post()
        image = post.get("image")
        overwrite = post.get("overwrite")
        upload_type = post.get("type")
        if upload_type is None:
            upload_type = "input"
        upload_dir = self.env.dirs.by_type(upload_type)
        if upload_dir is None:
            # ComfyUI fails with an unhandled error (a 500) on an unknown type.
            raise RuntimeError(f"unknown upload type {upload_type!r}")
        # A plain form field instead of a file also fails unhandled in ComfyUI (no .file).
        if not (image and image.file):
            return web.Response(status=400)
        filename = image.filename
        if not filename:
            return web.Response(status=400)
        subfolder = post.get("subfolder", "")
        folder = os.path.join(upload_dir, os.path.normpath(subfolder))
        filepath = os.path.abspath(os.path.join(folder, filename))
        if os.path.commonpath((upload_dir, filepath)) != upload_dir:
            return web.Response(status=400)
        name = await asyncio.to_thread(_store_upload, folder, filename, image.file, overwrite in ("true", "1"))
        return web.json_response({"name": name, "subfolder": subfolder, "type": upload_type})

    async def view(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        if "filename" not in query:
            return web.Response(status=404)
        filename, folder = self.env.dirs.annotated(query["filename"])
        if not filename:
            return web.Response(status=400)
        if filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        if folder is None:
            folder = self.env.dirs.by_type(query.get("type", "output"))
        if folder is None:
            return web.Response(status=400)
        if "subfolder" in query:
            full = os.path.join(folder, query["subfolder"])
            if os.path.commonpath((os.path.abspath(full), folder)) != folder:
                return web.Response(status=403)
            folder = full
        filename = os.path.basename(filename)
        path = os.path.join(folder, filename)
        if not os.path.isfile(path):
            return web.Response(status=404)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript",
                            "text/css"}:
            content_type = "application/octet-stream"
        return web.FileResponse(path, headers={"Content-Disposition": f'filename="{filename}"',
                                               "Content-Type": content_type})

    # --- queue and history -----------------------------------------------------------------

    async def get_history(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        max_items = int(query["max_items"]) if "max_items" in query else None
        offset = int(query["offset"]) if "offset" in query else -1
        return web.json_response(self.queue.get_history(max_items=max_items, offset=offset))

    async def get_history_item(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.queue.get_history(prompt_id=request.match_info["prompt_id"]))

    async def get_queue(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"queue_running": self.queue.running(), "queue_pending": self.queue.pending()})

    async def post_prompt(self, request: web.Request) -> web.StreamResponse:
        logger.info("got prompt")
        # Not guarded, as in ComfyUI: a body that is not JSON is an unhandled error, a 500.
        json_data = await request.json()
        if "number" in json_data:
            number: float = float(json_data["number"])
        else:
            number = self.number
            if "front" in json_data and json_data["front"]:
                number = -number
            self.number += 1

        if "prompt" not in json_data:
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided",
                     "extra_info": {}}
            return web.json_response({"error": error, "node_errors": {}}, status=400)

        prompt = json_data["prompt"]
        prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
        partial = json_data.get("partial_execution_targets") if "partial_execution_targets" in json_data else None
        valid = self.validator.validate_prompt(prompt, partial)
        extra_data = json_data["extra_data"] if "extra_data" in json_data else {}
        if "client_id" in json_data:
            extra_data["client_id"] = json_data["client_id"]
        if valid.ok:
            self.queue.put(QueueItem(number, prompt_id, prompt, extra_data, valid.good_outputs))
            return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": valid.node_errors})
        logger.warning("invalid prompt: %s", valid.error)
        return web.json_response({"error": valid.error, "node_errors": valid.node_errors}, status=400)

    async def post_queue(self, request: web.Request) -> web.StreamResponse:
        json_data = await request.json()
        if "clear" in json_data and json_data["clear"]:
            self.queue.wipe_queue()
        if "delete" in json_data:
            for prompt_id in json_data["delete"]:
                self.queue.delete_queue_item(prompt_id)
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.StreamResponse:
        try:
            json_data = await request.json()
        except json.JSONDecodeError:
            json_data = {}
        prompt_id = json_data.get("prompt_id")
        if prompt_id:
            if any(item.prompt_id == prompt_id for item in self.queue.running()):
                logger.info("Interrupting prompt %s", prompt_id)
                self.executor.interrupt.set()
            else:
                logger.info("Prompt %s is not currently running, skipping interrupt", prompt_id)
        else:
            logger.info("Global interrupt (no prompt_id specified)")
            self.executor.interrupt.set()
        return web.Response(status=200)

    async def post_free(self, request: web.Request) -> web.StreamResponse:
        json_data = await request.json()
        if json_data.get("unload_models", False):
            self.queue.set_flag("unload_models", True)
        if json_data.get("free_memory", False):
            self.queue.set_flag("free_memory", True)
        return web.Response(status=200)

    async def post_history(self, request: web.Request) -> web.StreamResponse:
        json_data = await request.json()
        if "clear" in json_data and json_data["clear"]:
            self.queue.wipe_history()
        if "delete" in json_data:
            for prompt_id in json_data["delete"]:
                self.queue.delete_history_item(prompt_id)
        return web.Response(status=200)

    # --- simulator knobs -------------------------------------------------------------------

    async def get_knobs(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.env.knobs.to_json())

    async def post_knobs(self, request: web.Request) -> web.StreamResponse:
        try:
            changes = await request.json()
        except json.JSONDecodeError as ex:
            return web.json_response({"error": f"body is not JSON: {ex}"}, status=400)
        try:
            changed = self.env.knobs.update(changes)
        except KnobError as ex:
            return web.json_response({"error": ex.reason, "knob": ex.knob}, status=400)
        return web.json_response({"changed": changed, "knobs": self.env.knobs.to_json()})


SERVER_KEY = web.AppKey("simulator_server", SimulatorServer)


def _store_upload(folder: str, filename: str, source: Any, overwrite: bool) -> str:
    """Save an upload and return the name it got: ``x.png`` becomes ``x (1).png``... on a
    clash unless ``overwrite``; a clash with identical content keeps the existing file (and
    its name). Blocking: run in a thread."""
    content = source.read()
    os.makedirs(folder, exist_ok=True)
    filepath = os.path.join(folder, filename)
    stem, ext = os.path.splitext(filename)
    if not overwrite:
        digest = hashlib.sha256(content).hexdigest()
        i = 1
        while os.path.exists(filepath):
            with open(filepath, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() == digest:
                    return filename
            filename = f"{stem} ({i}){ext}"
            filepath = os.path.join(folder, filename)
            i += 1
    with open(filepath, "wb") as f:
        f.write(content)
    return filename


@web.middleware
async def _origin_only_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ComfyUI refuses (403) browser requests to a loopback host from a different origin."""
    if "Host" in request.headers and "Origin" in request.headers:
        host = request.headers["Host"].lower()
        origin = urllib.parse.urlparse(request.headers["Origin"])
        host_parsed = urllib.parse.urlsplit("//" + host)
        origin_domain = origin.netloc.lower()
        host_domain: str | None = host
        if origin.port is None:
            host_domain = host_parsed.hostname
        if host_parsed.port is None:
            origin_domain = origin.hostname or ""
        if _is_loopback(host_parsed.hostname) and host_domain and origin_domain and host_domain != origin_domain:
            logger.warning("WARNING: request with non matching host and origin %s != %s, returning 403",
                           host_domain, origin_domain)
            return web.Response(status=403)
    if request.method == "OPTIONS":
        return web.Response()
    return await handler(request)


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cors_middleware(allowed_origin: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = web.Response() if request.method == "OPTIONS" else await handler(request)
        response.headers["Access-Control-Allow-Origin"] = allowed_origin
        response.headers["Access-Control-Allow-Methods"] = "POST, GET, DELETE, PUT, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
        response.headers["Access-Control-Allow-Credentials"] = "true"
        return response

    return middleware
