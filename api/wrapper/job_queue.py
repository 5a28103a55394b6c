"""The wrapper's own queue: jobs accepted and not yet running, in arrival order; and what a
streaming client hears about its place in it."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from api.contract.result import JobStatus
from api.wrapper.jobs import Job


class JobQueue:
    def __init__(self) -> None:
        self._jobs: collections.deque[Job] = collections.deque()
        self._wakeup = asyncio.Event()

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self._jobs)

    def __contains__(self, job: object) -> bool:
        return job in self._jobs

    def __getitem__(self, index: int) -> Job:
        return self._jobs[index]

    def append(self, job: Job) -> None:
        self._jobs.append(job)
        self.wake()

    def remove(self, job: Job) -> None:
        self._jobs.remove(job)

    def position(self, job: Job) -> int:
        """1-based place in the queue; 0 when running or done."""
        try:
            return self._jobs.index(job) + 1
        except ValueError:
            return 0

    def next_job(self, handed_ahead: Iterable[str]) -> Job | None:
        """The job to run next: ComfyUI's own queue order first (the prompts handed to it
        ahead, in the order they were handed), else the first job that is not waiting for a
        model download — a download never holds ComfyUI while others could run."""
        for job_id in handed_ahead:
            for job in self._jobs:
                if job.id == job_id:
                    return job
        for job in self._jobs:
            if not job.awaiting_models:
                return job
        return None

    def wake(self) -> None:
        """Something changed (a job arrived, its models came in): look again."""
        self._wakeup.set()

    async def take(self, handed_ahead: Callable[[], Iterable[str]]) -> Job:
        """Wait for the next job to run (see `next_job`) and remove it from the queue."""
        while True:
            job = self.next_job(handed_ahead())
            if job is not None:
                self._jobs.remove(job)
                return job
            self._wakeup.clear()
            await self._wakeup.wait()


def status_event(job: Job, queue: JobQueue) -> dict[str, Any]:
    """What a streaming client hears about its request: status and place in the queue."""
    return {"request_id": job.id, "status": job.status.value, "message": job.message,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "elapsed_time": job.elapsed(),
            "queue_position": {"position": queue.position(job), "queue_size": len(queue)}}


def announce(job: Job, queue: JobQueue) -> None:
    """Tell the job's streaming clients, if any, where it stands now."""
    if job.listeners:
        event = "queued" if job.status is JobStatus.PENDING else "status"
        job.publish({"event": event, **status_event(job, queue)})
