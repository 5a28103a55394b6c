"""ComfyUI's HTTP and WebSocket API, served by aiohttp over the simulated executor.

Routes, status codes and bodies follow ComfyUI 0.3.64's ``server.py``, or with
``--api-version 0.38.1`` the newest one read (jobs API, asset ids, canonical prompt ids,
cross-site refusal); every route is also served under ``/api``. Simulator-only routes:
``GET/POST /__sim__/knobs`` read and change the knobs, ``GET /__sim__/assets`` counts the asset
catalog. What is *not* simulated: the web UI, ``/upload/mask``, ``/view``'s ``preview`` and
``channel`` conversions (the stored file is returned as is), users, models management, the
assets API, internal routes and binary preview frames.
"""

from __future__ import annotations

import asyncio
import errno
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

from simulator import jobs
from simulator.api_version import ApiVersion
from simulator.assets import AssetRoot, Assets, NoAssets
from simulator.errors import KnobError
from simulator.execution import ExecutionOutcome, PromptExecutor
from simulator.feature_flags import server_features
from simulator.knobs import DeviceType
from simulator.nodes import NODE_CLASSES, NodeEnv, node_info
from simulator.prompt_queue import SENSITIVE_EXTRA_DATA_KEYS, ExecutionStatus, PromptQueue, QueueItem
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
_NEWER_MODEL_FOLDERS = [*_MODEL_FOLDERS, "background_removal", "frame_interpolation", "geometry_estimation",
                        "optical_flow", "detection"]
# What /system_stats lists as comfy_package_versions in the newest mode (simulated versions).
_COMFY_PACKAGES = [{"name": "comfyui-frontend-package", "installed": _FRONTEND_VERSION, "required": _FRONTEND_VERSION},
                   {"name": "comfyui-workflow-templates", "installed": _TEMPLATES_VERSION,
                    "required": _TEMPLATES_VERSION}]
# Types a browser could render or run: the newest /view sends them as downloads.
_RENDERABLE_TYPES = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript",
                     "application/javascript", "application/x-javascript", "application/ecmascript", "text/css",
                     "image/svg+xml", "application/xml", "text/xml", "message/rfc822"}
_OFFLINE_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval' blob:; "
                "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self'; "
                "connect-src 'self' data:; frame-src 'self'; object-src 'self';")
ASSETS_GC_SECONDS = 10.0


@dataclass
class ServerOptions:
    max_upload_size_mb: float = 100
    enable_cors_header: str | None = None
    cache_enabled: bool = True
    api_version: ApiVersion = ApiVersion.V0_3_64
    # Newest mode only:
    offline: bool = False  # --offline: a restrictive Content-Security-Policy on every answer
    cli_feature_flags: dict[str, Any] | None = None  # --feature-flag extras
    assets_gc_seconds: float = ASSETS_GC_SECONDS  # the tick after prompts that walks the output folder


class SimulatorServer:
    """Holds the sockets, the queue and the executor, and answers the routes."""

    def __init__(self, env: NodeEnv, options: ServerOptions, assets: Assets | None = None) -> None:
        self.env = env
        self.options = options
        self.newer = options.api_version.is_newer
        self.assets: Assets = assets if assets is not None else NoAssets()
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.sockets_metadata: dict[str, dict[str, Any]] = {}
        self.number = 0
        self._messages: asyncio.Queue[tuple[str, dict[str, Any], str | None]] = asyncio.Queue()
        self.queue = PromptQueue(self.queue_updated)
        self.executor = PromptExecutor(env, self, cache_enabled=options.cache_enabled, assets=self.assets)
        self.validator = PromptValidator(env)
        self._gc_due = asyncio.Event()
        self._scan: asyncio.Task[None] | None = None
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
                self._gc_due.set()
            flags = self.queue.take_flags()
            if flags.get("free_memory"):
                self.executor.reset_caches()

    async def assets_loop(self) -> None:
        """ComfyUI's garbage-collection tick after prompts: at most every ``assets_gc_seconds``
        (the first one right after the first prompt), between prompts, a full walk of the
        output folder records every file found there."""
        last: float | None = None
        while True:
            await self._gc_due.wait()
            if last is not None:
                wait = self.options.assets_gc_seconds - (time.monotonic() - last)
                if wait > 0:
                    await asyncio.sleep(wait)
            while self.queue.is_busy():  # the walk is paused while a prompt runs
                await asyncio.sleep(0.05)
            self._gc_due.clear()
            last = time.monotonic()
            try:
                await self.assets.walk((AssetRoot.OUTPUT,))
            except Exception:
                logger.exception("Asset scan of the output folder failed")

    def start_scan(self, roots: tuple[AssetRoot, ...]) -> None:
        """A background scan (at start, on /object_info), unless one is running."""
        if not self.assets.enabled or (self._scan is not None and not self._scan.done()):
            return

        async def scan() -> None:
            try:
                await self.assets.walk(roots)
            except Exception:
                logger.exception("Asset scan failed")

        self._scan = asyncio.create_task(scan())

    # --- app -------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        middlewares: list[Any] = [_cors_middleware(self.options.enable_cors_header, self.newer)] \
            if self.options.enable_cors_header else [_origin_middleware(refuse_cross_site=self.newer)]
        if self.newer and self.options.offline:
            middlewares.append(_offline_middleware)
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
        if self.newer:
            # Registered with their /api prefix only; the /api copy makes /api/api/jobs too.
            routes += [
                ("GET", "/api/jobs", self.get_jobs),
                ("GET", "/api/jobs/{job_id}", self.get_job),
                ("POST", "/api/jobs/{job_id}/cancel", self.cancel_job),
                ("POST", "/api/jobs/cancel", self.cancel_jobs),
            ]
        # ComfyUI registers the /api copies first, then the plain paths.
        app.router.add_routes([web.route(m, "/api" + p, h) for m, p, h in routes if p != "/"])
        app.router.add_routes([web.route(m, p, h) for m, p, h in routes])
        app.router.add_get("/__sim__/knobs", self.get_knobs)
        app.router.add_post("/__sim__/knobs", self.post_knobs)
        app.router.add_get("/__sim__/assets", self.get_assets)
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
        return server_features(self.options.api_version, self.options.max_upload_size_mb, self.assets.enabled,
                               self.options.cli_feature_flags)

    # --- small routes ----------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="<!doctype html><title>ComfyUI simulator</title>"
                                 "<p>ComfyUI simulator: API only, no web UI.</p>",
                            content_type="text/html", headers={"Cache-Control": "no-cache"})

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([])

    def _model_folders(self) -> list[str]:
        return _NEWER_MODEL_FOLDERS if self.newer else _MODEL_FOLDERS

    async def model_folders(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._model_folders())

    async def models(self, request: web.Request) -> web.StreamResponse:
        folder = request.match_info["folder"]
        if folder not in self._model_folders():
            return web.Response(status=404)
        return web.json_response(self.env.checkpoint_names() if folder == "checkpoints" else [])

    async def extensions(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([])

    async def features(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._server_features())

    async def get_prompt(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.queue_info())

    async def object_info(self, request: web.Request) -> web.StreamResponse:
        # The newest ComfyUI starts an asset scan of every root when it serves the node list.
        self.start_scan((AssetRoot.MODELS, AssetRoot.INPUT, AssetRoot.OUTPUT))
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
        system: dict[str, Any] = {
            "os": sys.platform if self.newer else os.name,
            "ram_total": memory.total,
            "ram_free": memory.available,
            "comfyui_version": self.options.api_version.label,
            "required_frontend_version": _FRONTEND_VERSION,
            "installed_templates_version": _TEMPLATES_VERSION,
            "required_templates_version": _TEMPLATES_VERSION,
        }
        if self.newer:
            system["comfy_package_versions"] = [dict(p) for p in _COMFY_PACKAGES]
        system.update({
            "python_version": sys.version,
            "pytorch_version": "2.8.0+sim",
            "embedded_python": False,
        })
        if self.newer:
            system["deploy_environment"] = "local-git"
        system.update({"argv": sys.argv, "simulator": True, "platform": platform.platform()})
        return web.json_response({"system": system, "devices": [device]})

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
        answer: dict[str, Any] = {"name": name, "subfolder": subfolder, "type": upload_type}
        asset = await self.assets.register_upload(os.path.join(folder, name), name, upload_type)
        if asset is not None:
            answer["asset"] = asset
        return web.json_response(answer)

    async def view(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        if "filename" not in query:
            return web.Response(status=404)
        if self.newer and query["filename"].startswith("blake3:"):
            resolved = await self.assets.resolve_hash(query["filename"])
            if resolved is None:
                return web.Response(status=404)
            return self._file_answer(request, resolved.path, resolved.name, resolved.mime_type)
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
        if self.newer:
            return self._file_answer(request, path, filename, None)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript",
                            "text/css"}:
            content_type = "application/octet-stream"
        return web.FileResponse(path, headers={"Content-Disposition": f'filename="{filename}"',
                                               "Content-Type": content_type})

    def _file_answer(self, request: web.Request, path: str, filename: str,
                     content_type: str | None) -> web.StreamResponse:
        """The newest /view answer: nosniff always; types a browser would render or run are sent
        as downloads (except an SVG an <img> asks for), and not cached."""
        content_type = content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        safe = filename.replace("\\", "\\\\").replace('"', '\\"')
        disposition = f'filename="{safe}"'
        headers = {"X-Content-Type-Options": "nosniff"}
        normalized = content_type.split(";", 1)[0].strip().lower()
        if normalized in _RENDERABLE_TYPES or normalized.endswith(("+xml", "/xml")):
            headers["Vary"] = "Sec-Fetch-Dest"
            headers["Cache-Control"] = "no-store"
            if not (normalized == "image/svg+xml" and request.headers.get("Sec-Fetch-Dest") == "image"):
                content_type = "application/octet-stream"
                disposition = f'attachment; filename="{safe}"'
        headers["Content-Disposition"] = disposition
        headers["Content-Type"] = content_type
        return web.FileResponse(path, headers=headers)

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
        if self.newer:
            client_prompt_id = json_data.get("prompt_id")
            if client_prompt_id is None:  # absent or null: the server makes one
                prompt_id = str(uuid.uuid4())
            elif jobs.is_canonical_uuid(client_prompt_id):
                prompt_id = client_prompt_id
            else:
                error = {"type": "invalid_prompt_id", "message": "prompt_id must be a valid UUID",
                         "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
                                    "omit it to let the server generate one",
                         "extra_info": {}}
                return web.json_response({"error": error, "node_errors": {}}, status=400)
        else:
            prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
        partial = json_data.get("partial_execution_targets") if "partial_execution_targets" in json_data else None
        valid = self.validator.validate_prompt(prompt, partial)
        extra_data = json_data["extra_data"] if "extra_data" in json_data else {}
        if "client_id" in json_data:
            extra_data["client_id"] = json_data["client_id"]
        if self.newer and "comfy_usage_source" not in extra_data and request.headers.get("Comfy-Usage-Source"):
            extra_data["comfy_usage_source"] = request.headers["Comfy-Usage-Source"]
        if valid.ok:
            if self.newer:
                # Sensitive keys travel beside the queue item, never in it (nodes here use none).
                for key in SENSITIVE_EXTRA_DATA_KEYS:
                    extra_data.pop(key, None)
                extra_data["create_time"] = int(time.time() * 1000)
            self.queue.put(QueueItem(number, prompt_id, prompt, extra_data, valid.good_outputs))
            answer = web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": valid.node_errors})
            return await self._after_queueing(request, answer)
        logger.warning("invalid prompt: %s", valid.error)
        return web.json_response({"error": valid.error, "node_errors": valid.node_errors}, status=400)

    async def _after_queueing(self, request: web.Request, answer: web.StreamResponse) -> web.StreamResponse:
        """The post_prompt_delay / post_prompt_drop knobs: the prompt is queued already."""
        knobs = self.env.knobs
        if knobs.post_prompt_delay > 0:
            await asyncio.sleep(knobs.post_prompt_delay)
        if knobs.post_prompt_drop and request.transport is not None:
            logger.info("Dropping the POST /prompt answer (post_prompt_drop knob)")
            request.transport.abort()
        return answer

    async def post_queue(self, request: web.Request) -> web.StreamResponse:
        json_data = await request.json()
        if "clear" in json_data and json_data["clear"]:
            self.queue.wipe_queue()
        if "delete" in json_data:
            for prompt_id in json_data["delete"]:
                self.queue.delete_queue_item(prompt_id)
        return web.Response(status=200)

    # --- jobs (newest mode) -----------------------------------------------------------------

    async def get_jobs(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        statuses = list(jobs.JobStatus)
        if query.get("status"):
            wanted = [s.strip().lower() for s in query["status"].split(",") if s.strip()]
            invalid = [s for s in wanted if s not in jobs.ALL_STATUSES]
            if invalid:
                return _error(f"Invalid status value(s): {', '.join(invalid)}. "
                              f"Valid values: {', '.join(jobs.ALL_STATUSES)}")
            statuses = [jobs.JobStatus(s) for s in wanted]
        sort_by = query.get("sort_by", "created_at").lower()
        if sort_by not in {k.value for k in jobs.SortKey}:
            return _error("sort_by must be 'created_at' or 'execution_duration'")
        sort_order = query.get("sort_order", "desc").lower()
        if sort_order not in ("asc", "desc"):
            return _error("sort_order must be 'asc' or 'desc'")
        limit: int | None = None
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                return _error("limit must be an integer")
            if limit <= 0:
                return _error("limit must be a positive integer")
        offset = 0
        if "offset" in query:
            try:
                offset = max(0, int(query["offset"]))
            except ValueError:
                return _error("offset must be an integer")
        running, pending = self.queue.running(), self.queue.pending()
        found, total = jobs.list_jobs(running, pending, self.queue.get_history(), statuses,
                                      query.get("workflow_id"), jobs.SortKey(sort_by), sort_order == "desc",
                                      limit, offset)
        return web.json_response({"jobs": found, "pagination": {
            "offset": offset, "limit": limit, "total": total, "has_more": offset + len(found) < total}})

    async def get_job(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        # Running and pending first, history after: a prompt finishing in between is not lost.
        running, pending = self.queue.running(), self.queue.pending()
        job = jobs.find_job(job_id, running, pending, self.queue.get_history(prompt_id=job_id))
        if job is None:
            return web.json_response({"error": "Job not found"}, status=404)
        return web.json_response(job)

    def _cancel(self, job_id: str) -> bool:
        """Interrupt it if it runs, drop it if it waits; finished or unknown: nothing (False)."""
        def interrupt() -> bool:
            logger.info("Cancelling running prompt %s", job_id)
            return self.queue.interrupt_if_running(job_id, self.executor.interrupt.set)

        if any(item.prompt_id == job_id for item in self.queue.running()):
            return interrupt()
        if any(item.prompt_id == job_id for item in self.queue.pending()):
            logger.info("Cancelling pending prompt %s", job_id)
            return self.queue.delete_queue_item(job_id) or interrupt()
        return False

    async def cancel_job(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"cancelled": self._cancel(request.match_info["job_id"])})

    async def cancel_jobs(self, request: web.Request) -> web.StreamResponse:
        try:
            json_data = await request.json()
        except json.JSONDecodeError:
            return _error("Request body must be valid JSON")
        job_ids = json_data.get("job_ids") if isinstance(json_data, dict) else None
        if not isinstance(job_ids, list):
            return _error("job_ids must be a list")
        invalid = [j if isinstance(j, str) else repr(j) for j in job_ids if not jobs.is_canonical_uuid(j)]
        if invalid:
            return web.json_response({"error": "job_ids contains invalid id(s)", "invalid_ids": invalid}, status=400)
        cancelled = False
        for job_id in job_ids:
            cancelled = self._cancel(job_id) or cancelled
        return web.json_response({"cancelled": cancelled})

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

    async def get_assets(self, request: web.Request) -> web.StreamResponse:
        counts = await self.assets.counts()
        return web.json_response({"enabled": self.assets.enabled, **counts.to_json()})

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


def _error(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


def is_address_in_use(error: OSError) -> bool:
    return error.errno == errno.EADDRINUSE


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


def _origin_middleware(refuse_cross_site: bool) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        # The newest ComfyUI first refuses anything a browser marks as cross-site (exact match).
        if refuse_cross_site and request.headers.get("Sec-Fetch-Site") == "cross-site":
            logger.warning("WARNING: cross-site request to %s refused (Sec-Fetch-Site: cross-site), returning 403",
                           request.path)
            return web.Response(status=403)
        return await _origin_only(request, handler)

    return middleware


@web.middleware
async def _offline_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """--offline: the frontend may talk to nothing but this server."""
    response = web.Response() if request.method == "OPTIONS" else await handler(request)
    response.headers["Content-Security-Policy"] = _OFFLINE_CSP
    return response


async def _origin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
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


def _cors_middleware(allowed_origin: str, newer: bool) -> Callable[..., Awaitable[web.StreamResponse]]:
    methods = "POST, GET, DELETE, PUT, OPTIONS, PATCH" if newer else "POST, GET, DELETE, PUT, OPTIONS"

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = web.Response() if request.method == "OPTIONS" else await handler(request)
        response.headers["Access-Control-Allow-Origin"] = allowed_origin
        response.headers["Access-Control-Allow-Methods"] = methods
        response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
        response.headers["Access-Control-Allow-Credentials"] = "true"
        return response

    return middleware
