"""The generation service: a bounded FIFO in front of ComfyUI, one prompt at a time.

The service takes requests in (`submit`, `get`, `cancel`) and is made of parts, each with one job:

1. *prepare* (`InputPreparer`, right after a request is accepted, in parallel with others): its
   model URLs and input images, so that downloads never keep ComfyUI idle;
2. *generate* (`Runner` with `PromptExecution`, one job at a time, in arrival order, from the
   `JobQueue`): submit the graph, follow it to the end; while one runs, the `Prefetcher` hands
   the next prompts to ComfyUI's own queue so that ComfyUI never waits between two jobs;
3. *deliver* (`OutputDelivery`, a task of its own, so the runner moves on at once): collect the
   output files into the request's folder, inline base64, upload to S3.

Whatever ends a request, `Finisher` ends it the same way: result stored, client answered,
webhook sent; `outcomes` says what each error or result means for the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from api.comfy import ComfyClient
from api.contract.modifiers import ModifierRegistry, replace_random_ints
from api.contract.request import GenerateRequest, RequestInvalid
from api.wrapper import outcomes
from api.wrapper.background import Background
from api.wrapper.delivery import OutputDelivery
from api.wrapper.execution import ComfyGuard, PromptExecution, stop_prompt
from api.wrapper.finish import Finisher
from api.wrapper.job_queue import JobQueue, announce, status_event
from api.wrapper.jobs import Job
from api.wrapper.model_urls import (
    DEFAULT_MODEL_INPUTS,
    MODEL_URLS_OFF,
    ModelRef,
    ModelUrlResolver,
    find_model_urls,
)
from api.wrapper.prefetch import Prefetcher
from api.wrapper.preparation import InputPreparer
from api.wrapper.runner import Runner
from api.wrapper.s3 import S3Settings
from api.wrapper.store import ResultStore
from api.wrapper.webhooks import WebhookSettings

logger = logging.getLogger(__name__)

#: Seconds a stopping wrapper waits for outputs, uploads and result files under way.
STOP_GRACE = 10.0


class QueueFull(Exception):
    pass


class DuplicateRequest(Exception):
    pass


@dataclass(frozen=True)
class RequestDefaults:
    """The operator's S3 and webhook settings, under each request's own blocks."""

    s3: S3Settings
    webhook: WebhookSettings
    allow_private_webhooks: bool = False


@dataclass(frozen=True)
class Parts:
    """What the service is made of (see `api.wrapper.app` for how they are built)."""

    client: ComfyClient
    registry: ModifierRegistry
    store: ResultStore
    queue: JobQueue
    background: Background
    preparer: InputPreparer
    prefetcher: Prefetcher
    execution: PromptExecution
    delivery: OutputDelivery
    finisher: Finisher
    guard: ComfyGuard
    active: dict[str, Job]               # accepted and not finished, by id
    model_urls: ModelUrlResolver | None = None


class GenerationService:
    def __init__(self, parts: Parts, *, queue_size: int, defaults: RequestDefaults):
        self.parts = parts
        self.client = parts.client
        self.registry = parts.registry
        self.queue_size = queue_size
        self.defaults = defaults
        self.runner = Runner(parts.client, parts.queue, parts.prefetcher, parts.execution,
                             parts.delivery, parts.finisher, parts.background)
        self._queue = parts.queue
        self._active = parts.active
        self._task: asyncio.Task | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        recovered = await asyncio.to_thread(self.parts.store.load)
        if recovered:
            logger.info("result store: %d earlier results available", recovered)
        self._task = asyncio.create_task(self.runner.run(), name="generation-runner")

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop taking prompts; let outputs, uploads and result files that are under way
        finish (for up to `grace` seconds) so that nothing already answered is lost."""
        self.parts.prefetcher.stop()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.parts.background.drain(grace)

    def comfy_lost(self) -> None:
        """Told from outside (the daemon's signal) that ComfyUI died: check before submitting."""
        self.parts.guard.lost()
        self.client.forget_capabilities()  # it may come back as another version
        if self.parts.guard.suspect:
            logger.info("ComfyUI was lost: nothing is submitted until its port is ComfyUI's again")

    # --- intake ---------------------------------------------------------------------------------
    @property
    def current(self) -> Job | None:
        """The job whose prompt runs now."""
        return self.runner.current

    def queue_depth(self) -> int:
        return len(self._queue)

    def submit(self, request: GenerateRequest, *, record_queued: bool = True) -> Job:
        """Accept a valid request (raises RequestInvalid, DuplicateRequest or QueueFull).

        `record_queued` writes the request to the result store at once, so that a client who
        polls `/result/{id}` learns of a wrapper restart; a client still connected for the
        answer (sync, stream) learns it from the broken connection and needs no record."""
        if request.request_id in self._active:
            raise DuplicateRequest(request.request_id)
        if len(self._queue) >= self.queue_size:
            raise QueueFull()
        graph = build_graph(self.registry, request)
        refs = self._model_refs(request, graph)
        job = Job(request)
        job.awaiting_models = bool(refs)
        job.prepared = asyncio.get_running_loop().create_future()
        self._active[job.id] = job
        self._queue.append(job)
        background = self.parts.background
        if self.parts.preparer.needed(graph, refs):
            background.spawn(self.parts.preparer.prepare(job, graph, refs,
                                                         self.runner.inputs_ready),
                             f"prepare-{job.id}")
        else:  # nothing to fetch or upload: no task for it
            job.prepared.set_result(graph)
            self.runner.inputs_ready()
        if record_queued:
            job.persisting = background.spawn(self.parts.store.save(job.to_record()),
                                              f"persist-{job.id}")
        announce(job, self._queue)
        return job

    def _model_refs(self, request: GenerateRequest, graph: dict[str, Any]) -> list[ModelRef]:
        """Model URLs in the graph; a URL that may not be fetched is a 400 now."""
        model_urls = self.parts.model_urls
        refs = find_model_urls(graph, model_urls.inputs if model_urls else DEFAULT_MODEL_INPUTS)
        if refs:
            policy = model_urls.policy if model_urls else MODEL_URLS_OFF
            problems = policy.problems(refs)
            if problems:
                raise RequestInvalid(problems, request.request_id)
        return refs

    async def get(self, request_id: str) -> Job | dict[str, Any] | None:
        return self._active.get(request_id) or await self.parts.store.get(request_id)

    async def cancel(self, request_id: str) -> Job | dict[str, Any] | None:
        job = self._active.get(request_id)
        if job is None:
            return await self.parts.store.get(request_id)
        if job.status.terminal:
            return job
        job.cancel_requested = True
        if job in self._queue:
            self._queue.remove(job)
            submitted = self.parts.prefetcher.take(job)
            if submitted is not None:
                await asyncio.gather(submitted, return_exceptions=True)
                if job.prompt_id:
                    await stop_prompt(self.client, job)
            self.parts.finisher.finish(job, outcomes.CANCELLED_QUEUED)
        elif job is self.current:
            await self.runner.stop_current(job)
        return job

    # --- what the service shows -----------------------------------------------------------------
    def status_event(self, job: Job) -> dict[str, Any]:
        return status_event(job, self._queue)

    def health_detail(self) -> dict[str, Any]:
        job, watch = self.runner.current, self.runner.watch
        webhooks = self.parts.finisher.webhooks
        return {
            "queue_depth": len(self._queue),
            "running": job.id if job else None,
            "prompt_id": job.prompt_id if job else None,
            "seconds_since_progress": round(time.monotonic() - watch.last_event_at, 3)
            if job and watch else None,
            "served": dict(self.parts.finisher.served),
            "webhooks": {"pending": webhooks.pending if webhooks else 0,
                         "spool_bytes": webhooks.spool_bytes if webhooks else 0,
                         "spool_dropped": webhooks.dropped if webhooks else 0},
        }


def build_graph(registry: ModifierRegistry, request: GenerateRequest) -> dict[str, Any]:
    """The graph a valid request runs: its modifier applied, or its workflow_json (raises
    RequestInvalid for an unknown modifier or modifications the modifier refuses)."""
    if request.modifier:
        modifier = registry.get(request.modifier)
        if modifier is None:
            known = ", ".join(registry.names()) or "none"
            raise RequestInvalid({"input.modifier": f"unknown modifier '{request.modifier}' "
                                                    f"(known: {known})"}, request.request_id)
        applied, problems = registry.apply(modifier, request.modifications)
        if problems:
            raise RequestInvalid(problems, request.request_id)
        return applied.graph
    return replace_random_ints(request.workflow)
