"""HTTP routes of the API wrapper (the ai-dock comfyui-api-wrapper's public contract, and more).

Status codes: 200 completed, 202 accepted (async), 400 invalid, 404 unknown id, 409 duplicate id,
413 too large, 422 a node failed while running, 499 cancelled, 502 ComfyUI lost or unreachable,
503 busy or not ready, 504 timed out; 500 only for a bug.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from api.contract.docs import add_doc_routes
from api.contract.http import error_middleware, expect_handler
from api.contract.http import json_response as _json
from api.contract.openapi import wrapper_document
from api.contract.request import (
    GenerateRequest,
    RequestInvalid,
    parse_json_body,
    parse_request,
)
from api.wrapper.jobs import Job
from api.wrapper.metrics import WrapperMetrics
from api.wrapper.retention import Retention
from api.wrapper.s3 import RequestFieldError, S3Settings
from api.wrapper.s3 import merge as merge_s3
from api.wrapper.service import DuplicateRequest, GenerationService, QueueFull
from api.wrapper.webhooks import WebhookSettings, check_webhook_url
from api.wrapper.webhooks import merge as merge_webhook

logger = logging.getLogger(__name__)

SERVICE = web.AppKey("service", GenerationService)
MAX_JSON_DEPTH = web.AppKey("max_json_depth", int)
PROBE_TIMEOUT = web.AppKey("probe_timeout", float)
METRICS = web.AppKey("metrics", WrapperMetrics)
RETENTION = web.AppKey("retention", Retention)
RETRY_AFTER_BUSY = "5"


def _result_response(found: Job | dict[str, Any]) -> web.Response:
    if isinstance(found, Job):
        return _json(found.result(), found.http_status())
    body = {k: v for k, v in found.items() if not k.startswith("_")}
    return _json(body, found.get("_http_status", 200))


def merge_blocks(parsed: GenerateRequest, s3_defaults: S3Settings,
                 webhook_defaults: WebhookSettings
                 ) -> tuple[dict[str, str], WebhookSettings | None]:
    """The request's s3 and webhook blocks over the operator's: the problems, and the webhook
    settings (None when its block has a problem)."""
    problems: dict[str, str] = {}
    hook = None
    try:
        merge_s3(s3_defaults, parsed.s3)
    except RequestFieldError as exc:
        problems[f"input.{exc.field}"] = exc.message
    try:
        hook = merge_webhook(webhook_defaults, parsed.webhook)
    except RequestFieldError as exc:
        problems[f"input.{exc.field}"] = exc.message
    return problems, hook


async def _read_request(request: web.Request, service: GenerationService, max_depth: int):
    raw = await request.read()  # over client_max_size: 413, answered by the middleware
    data = parse_json_body(raw, max_depth)
    parsed = parse_request(data, headers=dict(request.headers))
    defaults = service.defaults
    problems, hook = merge_blocks(parsed, defaults.s3, defaults.webhook)
    if hook is not None:
        if parsed.webhook and parsed.webhook.get("url"):
            trusted = {defaults.webhook.url} if defaults.webhook.url else set()
            reason = await check_webhook_url(hook.url, defaults.allow_private_webhooks, trusted)
            if reason:
                problems["input.webhook.url"] = reason
    if problems:
        raise RequestInvalid(problems, parsed.request_id)
    return parsed


async def _accept(request: web.Request, *, record_queued: bool = False
                  ) -> Job | web.Response:
    service = request.app[SERVICE]
    try:
        parsed = await _read_request(request, service, request.app[MAX_JSON_DEPTH])
        return service.submit(parsed, record_queued=record_queued)
    except RequestInvalid as exc:
        return _json(exc.body(), 400)
    except DuplicateRequest as exc:
        return _json({"error": f"request {exc} is already queued or running", "id": str(exc),
                      "status": "failed"}, 409)
    except QueueFull:
        return _json({"error": f"queue full ({service.queue_size} waiting); retry later",
                      "status": "failed"}, 503, {"Retry-After": RETRY_AFTER_BUSY})


async def generate_sync(request: web.Request) -> web.StreamResponse:
    accepted = await _accept(request)
    if isinstance(accepted, web.Response):
        return accepted
    job = accepted
    try:
        await job.done.wait()
    except asyncio.CancelledError:
        # The client went away: its request is cancelled, so ComfyUI is not kept busy for nobody.
        logger.info("client of %s disconnected; cancelling it", job.id)
        asyncio.get_running_loop().create_task(request.app[SERVICE].cancel(job.id))
        raise
    return _json(job.result(), job.http_status())


async def generate_async(request: web.Request) -> web.Response:
    accepted = await _accept(request, record_queued=True)
    if isinstance(accepted, web.Response):
        return accepted
    return _json(accepted.result(), 202)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    accepted = await _accept(request)
    if isinstance(accepted, web.Response):
        return accepted
    job = accepted
    queue: asyncio.Queue = asyncio.Queue()
    job.listeners.append(queue)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    first = {"event": "queued", **service.status_event(job)}
    try:
        await _send_event(response, first)
        while True:
            if job.done.is_set() and queue.empty():
                break
            event = await queue.get()
            await _send_event(response, event)
            if event.get("event") == "final_result":
                break
    except asyncio.CancelledError:
        _cancel_unfinished(service, job)
        raise
    except ConnectionResetError:
        # The client hung up between two events: like a cancelled handler, not a bug.
        logger.info("client of %s stream disconnected; cancelling it", job.id)
        _cancel_unfinished(service, job)
        return response
    finally:
        if queue in job.listeners:
            job.listeners.remove(queue)
    await response.write_eof()
    return response


def _cancel_unfinished(service: GenerationService, job: Job) -> None:
    if not job.done.is_set():
        asyncio.get_running_loop().create_task(service.cancel(job.id))


async def _send_event(response: web.StreamResponse, event: dict[str, Any]) -> None:
    name = event.get("event", "message")
    data = {k: v for k, v in event.items() if k != "event"}
    await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())


async def get_result(request: web.Request) -> web.Response:
    found = await request.app[SERVICE].get(request.match_info["request_id"])
    if found is None:
        return _json({"error": f"no request {request.match_info['request_id']} "
                               "(unknown, or its result expired)"}, 404)
    return _result_response(found)


async def cancel(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    found = await request.app[SERVICE].cancel(request_id)
    if found is None:
        return _json({"error": f"no request {request_id}"}, 404)
    if isinstance(found, Job):
        return _json(found.result(), 200)
    body = {k: v for k, v in found.items() if not k.startswith("_")}
    return _json(body, 200)


async def health(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    detail = service.health_detail()
    retention = request.app.get(RETENTION)
    if retention is not None:
        detail["retention"] = retention.snapshot()
    # What a long run must keep flat (checked by the endurance run): tasks of this process.
    detail["asyncio_tasks"] = len(asyncio.all_tasks())
    try:
        await service.client.probe(timeout=request.app[PROBE_TIMEOUT])
    except Exception as exc:  # every failure of the probe is a reason, never a 500
        return _json({"status": "unhealthy", "reason": f"ComfyUI: {exc}", **detail}, 503)
    return _json({"status": "healthy", "reason": "ComfyUI answers HTTP and WebSocket", **detail})


async def queue_info(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return _json({"queue_depth": service.queue_depth(), "running": service.current.id
                  if service.current else None, "queue_size": service.queue_size})


async def list_modifiers(request: web.Request) -> web.Response:
    registry = request.app[SERVICE].registry
    return _json({"modifiers": [
        {"name": m.name, "description": m.description,
         "keys": {k: {"type": b.type, "aliases": list(b.aliases)} for k, b in m.bindings.items()}}
        for m in registry.modifiers.values()]})


async def retention_pass(request: web.Request) -> web.Response:
    """POST /retention {"free_bytes": N}: a retention pass now (the daemon's disk guard asks
    for one at a warning); answers its report. Loopback only, like every wrapper route."""
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        return _json({"error": "the body must be JSON: {\"free_bytes\": N}"}, 400)
    want = body.get("free_bytes", 0) if isinstance(body, dict) else None
    if isinstance(want, bool) or not isinstance(want, int) or want < 0:
        return _json({"error": "free_bytes must be a whole number of bytes >= 0"}, 400)
    report = await request.app[RETENTION].run(want_bytes=want)
    return _json(report.to_json())


async def retention_state(request: web.Request) -> web.Response:
    return _json(request.app[RETENTION].snapshot())


async def metrics_route(request: web.Request) -> web.Response:
    payload, content_type = request.app[METRICS].render()
    return web.Response(body=payload, headers={"Content-Type": content_type})


def build_app(service: GenerationService, *, max_body_bytes: int, max_json_depth: int,
              probe_timeout: float = 3.0, metrics: WrapperMetrics | None = None,
              retention: Retention | None = None) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes,
                          middlewares=[error_middleware("wrapper", "api.max_body_bytes")])
    app[SERVICE] = service
    app[MAX_JSON_DEPTH] = max_json_depth
    app[PROBE_TIMEOUT] = probe_timeout
    app.router.add_post("/generate/sync", generate_sync, expect_handler=expect_handler)
    app.router.add_post("/generate", generate_async, expect_handler=expect_handler)
    app.router.add_post("/generate/stream", generate_stream, expect_handler=expect_handler)
    app.router.add_get("/result/{request_id}", get_result)
    app.router.add_post("/cancel/{request_id}", cancel, expect_handler=expect_handler)
    app.router.add_get("/health", health)
    app.router.add_get("/queue-info", queue_info)
    app.router.add_get("/modifiers", list_modifiers)
    if retention is not None:
        app[RETENTION] = retention
        app.router.add_post("/retention", retention_pass)
        app.router.add_get("/retention", retention_state)
    add_doc_routes(app, lambda: wrapper_document(service.registry),
                   title="comfy-worker API wrapper")
    # The wrapper listens on loopback only; the daemon reads this and serves it on.
    app[METRICS] = metrics if metrics is not None else WrapperMetrics()
    app.router.add_get("/metrics", metrics_route)
    return app
