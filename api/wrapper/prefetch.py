"""The second queue: prompts handed to ComfyUI's own queue ahead of the one running.

ComfyUI starts each the moment the previous one ends, so it never sits idle between two jobs
while the wrapper follows one and submits the next. A prompt is handed ahead only once the
running one is in ComfyUI's queue (its POST was answered), one submission at a time and in the
wrapper's queue order, so that no prompt overtakes another; a job whose inputs are not ready yet
ends the walk. The runner then takes each job's submission (`take`) in that same order.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator

from api.comfy import ComfyClient, Submission, new_prompt_id
from api.wrapper.job_queue import JobQueue
from api.wrapper.jobs import Job

#: Prompts handed to ComfyUI's queue ahead of the one running (ComfyUI runs them in order).
PREFETCH_DEPTH = 8


class Prefetcher:
    def __init__(self, client: ComfyClient, queue: JobQueue,
                 stop_prompt: Callable[[Job], Awaitable[bool]], depth: int = PREFETCH_DEPTH):
        self._client = client
        self._queue = queue
        self._stop_prompt = stop_prompt
        self._depth = depth
        # Job id -> its submission (a future: the POST may still be on its way), in the order
        # handed; the runner takes them in that order.
        self._handed: dict[str, asyncio.Future[Submission]] = {}
        self._walker: asyncio.Task | None = None

    def order(self) -> Iterator[str]:
        """Ids of the jobs handed ahead, in ComfyUI's queue order."""
        return iter(self._handed)

    def kick(self, running_is_queued: bool) -> None:
        """Hand the waiting jobs' prompts ahead, once the running job's prompt is in ComfyUI's
        queue (its POST was answered): none may overtake it."""
        if not running_is_queued:
            return
        if self._walker is None or self._walker.done():
            self._walker = asyncio.create_task(self._walk(), name="prefetch")

    def take(self, job: Job) -> asyncio.Future[Submission] | None:
        """The job's submission, when it was handed ahead (the runner's or a cancel's)."""
        return self._handed.pop(job.id, None)

    def forget(self) -> None:
        """ComfyUI restarted: the prompts handed to the old one died with it; each waiting job
        goes again in its turn (and is handed ahead again once the one before it runs)."""
        self.stop()
        for waiting in self._queue:
            if self._handed.pop(waiting.id, None) is not None:
                waiting.prompt_id = None

    def stop(self) -> None:
        if self._walker is not None:
            self._walker.cancel()
            self._walker = None

    async def _walk(self) -> None:
        index = 0
        while index < len(self._queue) and index < self._depth:
            job = self._queue[index]
            index += 1
            if job.id in self._handed or job.cancel_requested or job.awaiting_models:
                continue
            prepared = job.prepared
            if prepared is None or not prepared.done() or prepared.exception() is not None:
                return
            future: asyncio.Future[Submission] = asyncio.get_running_loop().create_future()
            self._handed[job.id] = future
            job.prompt_id = new_prompt_id()  # before posting: a cancel meanwhile can name it
            try:
                submission = await self._client.submit(prepared.result(), prompt_id=job.prompt_id,
                                                       client_id=uuid.uuid4().hex)
            except Exception as exc:  # the runner reports it when the job's turn comes
                future.set_exception(exc)
                future.exception()  # retrieved here; the runner raises it again
                return
            future.set_result(submission)
            if job.cancel_requested:  # cancelled while its prompt was on the way
                await self._stop_prompt(job)
