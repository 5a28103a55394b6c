"""The single runner: takes the wrapper's jobs in turn and sees each through ComfyUI.

For each job: wait for its inputs (stage 1, already under way), run its prompt (stage 2,
`PromptExecution`), then hand its outputs to a task of their own (stage 3, `OutputDelivery`) and
move on at once. While one runs, the `Prefetcher` hands the next prompts to ComfyUI's own queue.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from api.comfy import ComfyClient, ComfyConnectionError, ComfyError, ComfyHTTPError, PromptResult
from api.contract.result import FailureKind, JobStatus, now_ms
from api.wrapper import outcomes
from api.wrapper.background import Background
from api.wrapper.delivery import OutputDelivery
from api.wrapper.diskfull import DiskFull, room_text
from api.wrapper.execution import (
    PromptExecution,
    PromptTimedOut,
    PromptWatch,
    PromptWithdrawn,
    stop_prompt,
)
from api.wrapper.finish import Finisher
from api.wrapper.inputs import InputError
from api.wrapper.job_queue import JobQueue, announce, status_event
from api.wrapper.jobs import Job
from api.wrapper.prefetch import Prefetcher

logger = logging.getLogger(__name__)


class Runner:
    def __init__(self, client: ComfyClient, queue: JobQueue, prefetcher: Prefetcher,
                 execution: PromptExecution, delivery: OutputDelivery, finisher: Finisher,
                 background: Background):
        self._client = client
        self._queue = queue
        self._prefetcher = prefetcher
        self._execution = execution
        self._delivery = delivery
        self._finisher = finisher
        self._background = background
        self.current: Job | None = None
        self.watch: PromptWatch | None = None  # the running prompt's events

    async def run(self) -> None:
        while True:
            job = await self._queue.take(self._prefetcher.order)
            for waiting in self._queue:
                announce(waiting, self._queue)
            self.current = job
            try:
                await self._generate(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("request %s: unexpected error", job.id)
                self._finisher.finish(job, outcomes.INTERNAL_ERROR)
            finally:
                self.current = None
                self.watch = None

    async def _generate(self, job: Job) -> None:
        graph = await self._inputs_of(job)
        if graph is None:
            return
        await self._delivery.learn_folder()
        job.status = JobStatus.GENERATING
        job.message = "Generating."
        job.started_at_ms = now_ms()
        self.watch = PromptWatch(job, self._publish_progress, self._queued_in_comfyui)
        announce(job, self._queue)
        try:
            result = await self._execution.run(job, graph, self.watch)
        except PromptTimedOut:
            self._finisher.finish(job, outcomes.timed_out(self._execution.request_timeout))
            return
        except PromptWithdrawn:
            self._finisher.finish(job, outcomes.CANCELLED_BEFORE_START)
            return
        except ComfyError as exc:
            outcome = outcomes.of_error(exc, job.cancel_requested)
            if outcome is None:
                raise
            self._finisher.finish(job, outcome)
            return
        job.prompt_id = result.prompt_id
        job.generated_at_ms = now_ms()
        job.steps = result.sampling.steps
        job.sampling_its = result.sampling.its
        job.comfyui_response = {result.prompt_id: result.history} if result.history else {}
        outcome = outcomes.of_result(result, job.cancel_requested)
        if outcome is not None:
            if outcome.failure is FailureKind.DISK_FULL:  # say how full, and where
                room = await asyncio.to_thread(room_text, self._delivery.folder.path)
                outcome = outcomes.with_room(outcome, room)
            self._finisher.finish(job, outcome)
            return
        job.status = JobStatus.GENERATED
        job.message = "Generated; collecting outputs."
        announce(job, self._queue)
        # The runner moves on now: outputs, uploads and webhooks never hold ComfyUI.
        self._background.spawn(self._deliver(job, result), f"postprocess-{job.id}")

    async def _inputs_of(self, job: Job) -> dict[str, Any] | None:
        """The job's graph once its inputs are ready; None when that ended the request."""
        job.status = JobStatus.PROCESSING
        job.message = "Preparing inputs."
        announce(job, self._queue)
        assert job.prepared is not None
        try:
            graph = await job.prepared
        except (InputError, ComfyConnectionError, ComfyHTTPError, DiskFull) as exc:
            self._finisher.finish(job, outcomes.of_inputs(exc))
            return None
        if job.cancel_requested:
            self._finisher.finish(job, outcomes.CANCELLED_BEFORE_START)
            return None
        return graph

    async def _deliver(self, job: Job, result: PromptResult) -> None:
        try:
            failed_uploads = await self._delivery.deliver(job, result)
        except asyncio.CancelledError:
            raise
        except DiskFull as exc:
            self._finisher.finish(job, outcomes.disk_full(exc))
            return
        except Exception:
            logger.exception("request %s: collecting outputs failed", job.id)
            self._finisher.finish(job, outcomes.OUTPUTS_FAILED)
            return
        self._finisher.finish(job, outcomes.completed(failed_uploads))

    # --- what the parts tell the runner ---------------------------------------------------------
    def inputs_ready(self) -> None:
        """A job's models or inputs are in: it may run, or be handed ahead to ComfyUI, now."""
        self._queue.wake()
        self._prefetcher.kick(self.watch is not None and self.watch.queued)

    async def stop_current(self, job: Job) -> None:
        """The running job was cancelled: stop its prompt in ComfyUI. A prompt that had not
        begun to run is out of ComfyUI's queue then, and nobody waits for it any more; one that
        runs is interrupted and ends as such. While its POST is on its way there is nothing to
        name yet: `_queued_in_comfyui` comes back here once ComfyUI has it."""
        watch = self.watch
        if watch is None or watch.job is not job or not watch.queued:
            return
        if await stop_prompt(self._client, job) and not watch.executing:
            self._execution.withdraw(job)

    def _queued_in_comfyui(self, job: Job) -> None:
        """The running job's prompt is in ComfyUI's queue (its POST was answered)."""
        if job.cancel_requested:  # cancelled while it was being submitted
            self._background.spawn(self.stop_current(job), f"stop-{job.id}")
        self._prefetcher.kick(True)  # the next one may queue behind it now
        self._delivery.prepare(job)  # while ComfyUI runs it, not while its client waits

    def _publish_progress(self, job: Job) -> None:
        job.publish({"event": "progress", **status_event(job, self._queue),
                     "progress": job.last_progress})
