"""The end of every request, whatever ended it: the job takes its outcome, its waiting client is
answered, its result stays readable at /result/{id} and is written to disk, and its webhook
goes out."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from typing import Callable

from api.contract.result import JobStatus, now_ms
from api.wrapper.background import Background
from api.wrapper.jobs import Job
from api.wrapper.metrics import WrapperMetrics
from api.wrapper.model_urls import ModelUrlResolver
from api.wrapper.outcomes import Outcome
from api.wrapper.retention import Retention
from api.wrapper.store import ResultStore
from api.wrapper.webhooks import WebhookDispatcher, WebhookSettings
from api.wrapper.webhooks import merge as merge_webhook

logger = logging.getLogger(__name__)


class Finisher:
    def __init__(self, store: ResultStore, background: Background, active: dict[str, Job], *,
                 webhooks: WebhookDispatcher | None, webhook_defaults: WebhookSettings,
                 metrics: WrapperMetrics | None = None,
                 model_urls: ModelUrlResolver | None = None,
                 retention: Retention | None = None,
                 after_answer: Callable[[], None] | None = None):
        self._store = store
        self._background = background
        self._active = active  # the jobs accepted and not finished, by id
        self.webhooks = webhooks
        self._webhook_defaults = webhook_defaults
        self._metrics = metrics
        self._model_urls = model_urls
        self._retention = retention
        #: Work that may wait until the client is answered (the ComfyClient's socket closes).
        self._after_answer = after_answer
        self.served: collections.Counter[str] = collections.Counter()  # by final status

    def finish(self, job: Job, outcome: Outcome) -> None:
        """End the job now. Its waiting client is answered first; the bookkeeping (metrics,
        log line, result record, file, webhook) follows in a task of its own, which runs
        before anything else can ask about the job (the client's next request included)."""
        status = outcome.status
        job.status = status
        job.message = outcome.message
        job.failure = outcome.failure if status is JobStatus.FAILED else None
        job.detail = dict(outcome.detail)
        job.completed_at_ms = now_ms()
        if job.model_leases and self._model_urls:  # the cache may evict its models from now on
            self._model_urls.release(job.model_leases)
            job.model_leases = []
        if job.generated_at_ms is None and job.started_at_ms:
            job.generated_at_ms = job.completed_at_ms
        if job.folder_made is not None and not job.output:
            with contextlib.suppress(OSError):  # made while it ran, and nothing came into it
                os.rmdir(job.folder_made)
            job.folder_made = None
        if job.listeners:
            job.publish({"event": "final_result", "request_id": job.id,
                         "status": "final_result", "result": job.result(),
                         "elapsed_time": job.elapsed()})
        job.done.set()
        self._background.spawn(self._settle(job), f"persist-final-{job.id}")

    async def _settle(self, job: Job) -> None:
        # This task's first step runs after the waiting client's, which wrote the answer.
        if self._after_answer is not None:
            self._after_answer()
        status = job.status
        self.served[status.value] += 1
        if self._metrics:
            kind = job.failure.value if job.failure else status.value
            self._metrics.job_finished(kind, job.timings(), job.started_at_ms is not None)
        level = logging.INFO if status is JobStatus.COMPLETED else logging.WARNING
        logger.log(level, "request %s %s: %s", job.id, status.value, job.message)
        record = job.to_record()
        self._store.remember(record)  # readable at /result/{id} from now on
        self._active.pop(job.id, None)
        if self._retention is not None:  # its files may go by the rules from now on
            self._retention.finished(job.id, job.output)
        self._send_webhook(job)
        if job.persisting is not None:  # the "queued" record must not land after this one
            await asyncio.gather(job.persisting, return_exceptions=True)
        await self._store.write(record)

    def _send_webhook(self, job: Job) -> None:
        if self.webhooks is None:
            return
        settings = merge_webhook(self._webhook_defaults, job.request.webhook)
        if not settings.enabled:
            return
        payload = {"id": job.id, "status": job.status.value, "message": job.message,
                   "output": job.output, "timings": job.timings(),
                   "extra": settings.extra_params or {}}
        self.webhooks.submit(settings, payload, job.id)
