"""Stage 2 of a request, by the single runner in arrival order: its prompt submitted to ComfyUI
(or taken from those handed ahead) and followed to the end, within the request's time limit.

A ComfyUI that went away (or came back empty) before the prompt ever ran is not the request's
fault: the prompt goes again, in its turn, on the restarted ComfyUI. Only a prompt that was
running fails. After a loss nothing is submitted until the process on ComfyUI's port is the one
the daemon started (a stranger may have taken the port meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from api.comfy import (
    Cached,
    ComfyClient,
    ComfyConnectionError,
    ComfyError,
    ComfyEvent,
    Executed,
    Executing,
    ExecutionStarted,
    Finished,
    Progress,
    PromptPlace,
    PromptResult,
    PromptVanished,
    Queued,
    Submission,
    new_prompt_id,
)
from api.wrapper.jobs import Job
from api.wrapper.prefetch import Prefetcher

logger = logging.getLogger(__name__)

#: ComfyUI events that mean it is running the prompt, not merely holding it in its queue.
_EXECUTING_EVENTS = (ExecutionStarted, Cached, Executing, Progress, Executed)
#: Seconds an interrupted prompt gets to end before it is no longer followed.
INTERRUPT_GRACE = 30.0


async def stop_prompt(client: ComfyClient, job: Job) -> bool:
    """Stop the job's prompt wherever it is in ComfyUI: still queued there, or running (through
    the jobs API where ComfyUI has it). False when ComfyUI could not be told."""
    assert job.prompt_id is not None
    try:
        await client.cancel(job.prompt_id)
    except ComfyError as exc:
        logger.warning("stopping the prompt of %s failed: %s", job.id, exc)
        return False
    return True


class PromptTimedOut(Exception):
    """The request's time limit passed; its prompt was interrupted."""


class PromptWithdrawn(Exception):
    """The job was cancelled and its prompt taken out of ComfyUI's queue before it ran."""


class ComfyGuard:
    """Whether the process on ComfyUI's port is the daemon's own, after ComfyUI was lost.

    `is_ours` asks the host (None when no daemon started this wrapper: nothing to ask)."""

    def __init__(self, is_ours: Callable[[], Awaitable[bool]] | None):
        self._is_ours = is_ours
        self._suspect = False

    def lost(self) -> None:
        """ComfyUI was lost: check the port's owner before the next submission."""
        self._suspect = self._is_ours is not None

    @property
    def suspect(self) -> bool:
        return self._suspect

    async def until_ours(self, deadline: float) -> None:
        """Submit nothing until the port is ComfyUI's again (the daemon will not call a stranger
        ready, and neither do we). Gives up at `deadline`; the submission then fails."""
        assert self._is_ours is not None
        while time.monotonic() < deadline:
            if await self._is_ours():
                self._suspect = False
                return
            await asyncio.sleep(0.25)


class PromptWatch:
    """Follows ComfyUI's events about one job's prompt: when the last one came, whether the
    prompt began running, its progress (published to the job's listeners)."""

    def __init__(self, job: Job, publish_progress: Callable[[Job], None],
                 queued: Callable[[Job], None]):
        self.job = job
        self.queued = False  # ComfyUI has it (the POST was answered, or a look-up found it)
        self.executing = False  # ComfyUI began running it (not merely queued it)
        self.last_event_at = time.monotonic()
        self._publish_progress = publish_progress
        self._queued = queued  # the prompt is in ComfyUI's queue: the next may follow it

    def __call__(self, event: ComfyEvent) -> None:
        job = self.job
        self.last_event_at = time.monotonic()
        if not self.queued and not isinstance(event, Finished):
            self.queued = True
            job.prompt_id = event.prompt_id
            self._queued(job)
        if isinstance(event, _EXECUTING_EVENTS):
            self.executing = True
        if isinstance(event, Progress):
            job.last_progress = {"step": int(event.value), "max": int(event.max),
                                 "its": round(event.its_per_second, 3)
                                 if event.its_per_second else None, "node": event.node}
            self._publish_progress(job)


class PromptExecution:
    def __init__(self, client: ComfyClient, prefetcher: Prefetcher, guard: ComfyGuard,
                 request_timeout: float):
        self._client = client
        self._prefetcher = prefetcher
        self._guard = guard
        self.request_timeout = request_timeout
        self.requeued = 0  # prompts submitted again after ComfyUI lost them before they ran
        self._following: tuple[Job, asyncio.Task] | None = None
        self._withdrawn: Job | None = None

    async def run(self, job: Job, graph: dict[str, Any], watch: PromptWatch) -> PromptResult:
        """The prompt's result; raises PromptTimedOut, or the client's error (ComfyError)."""
        deadline = time.monotonic() + self.request_timeout
        submitted = self._prefetcher.take(job)
        try:
            while True:
                if self._guard.suspect and submitted is None:
                    await self._guard.until_ours(deadline)
                run = asyncio.create_task(self._follow(submitted, graph, watch))
                submitted = None
                self._following = (job, run)
                # Not wait_for: at the deadline the prompt is interrupted, then followed a while.
                await asyncio.wait((run,), timeout=max(0.0, deadline - time.monotonic()))
                if not run.done():
                    raise asyncio.TimeoutError()
                if run.cancelled() and self._withdrawn is job:
                    raise PromptWithdrawn()
                try:
                    return run.result()
                except (ComfyConnectionError, PromptVanished) as exc:
                    self._guard.lost()
                    if watch.executing or job.cancel_requested or \
                            not await self._again_after_restart(job, exc, deadline):
                        raise
        except asyncio.TimeoutError:
            await self._interrupt_and_wait(job, run)
            raise PromptTimedOut() from None
        except asyncio.CancelledError:
            run.cancel()
            raise
        finally:
            self._following = self._withdrawn = None

    def withdraw(self, job: Job) -> None:
        """Stop following `job`'s prompt: it was cancelled and is out of ComfyUI's queue."""
        if self._following is not None and self._following[0] is job:
            self._withdrawn = job
            self._following[1].cancel()

    async def _follow(self, submitted: asyncio.Future[Submission] | None,
                      graph: dict[str, Any], watch: PromptWatch) -> PromptResult:
        watch.queued = False  # (again, on a try after a restart)
        if submitted is None:
            return await self._submit_and_follow(graph, watch)
        submission = await submitted  # raises what submitting raised (e.g. PromptRejected)
        watch(Queued(submission.prompt_id, submission.number, submission.node_errors))
        return await self._client.wait(submission.prompt_id, client_id=submission.client_id,
                                       graph=graph, on_event=watch)

    async def _submit_and_follow(self, graph: dict[str, Any], watch: PromptWatch
                                 ) -> PromptResult:
        """The prompt id is chosen before posting, so that a cancel during the POST can name
        it and a lost answer is settled by a look-up, never by posting it twice."""
        job, client = watch.job, self._client
        await client.capabilities()  # once per ComfyUI start: which calls it takes
        if job.prompt_id is not None:  # an earlier try went wrong: ComfyUI may have it after all
            found = await client.lookup(job.prompt_id)
            if found.place is not PromptPlace.UNKNOWN:
                watch(Queued(job.prompt_id, None, {}))
                return await client.wait(job.prompt_id, graph=graph, on_event=watch)
        else:
            job.prompt_id = new_prompt_id()
        return await client.run_prompt(graph, prompt_id=job.prompt_id, on_event=watch)

    async def _again_after_restart(self, job: Job, exc: Exception, deadline: float) -> bool:
        """Wait for a ComfyUI that answers again, to submit `job` anew; False when time is up."""
        logger.warning("request %s: ComfyUI lost its prompt before it ran (%s); submitting it "
                       "again on the restarted ComfyUI", job.id, exc)
        self._prefetcher.forget()
        delay = 0.2
        while time.monotonic() + delay < deadline:
            await asyncio.sleep(delay)
            if job.cancel_requested:
                return False
            try:
                await self._client.queue(timeout=2.0)
            except ComfyError:
                delay = min(delay * 2, 2.0)
                continue
            self.requeued += 1
            return True
        return False

    async def _interrupt_and_wait(self, job: Job, run: asyncio.Task) -> None:
        try:
            if job.prompt_id:  # dropped if still queued in ComfyUI, interrupted if it runs
                await self._client.cancel(job.prompt_id)
            await asyncio.wait_for(asyncio.shield(run), INTERRUPT_GRACE)
        except (asyncio.TimeoutError, ComfyError, asyncio.CancelledError):
            run.cancel()
        except Exception:  # the prompt's own outcome no longer matters
            pass
