"""What ComfyUI is doing, seen from the daemon, whoever submitted the prompts.

The daemon must notice a prompt that stopped making progress, and know ComfyUI's queue, with any
wrapper that keeps the contract — not only with this project's own, whose `/health` happens to
report `seconds_since_progress`. Asking ComfyUI directly is the one source every wrapper shares.

What ComfyUI lets an outsider see (facts of ComfyUI 0.3.x): its `progress`, `executing` and
`executed` WebSocket frames go only to the `client_id` that submitted the prompt (to every socket
only when a prompt came without one), while `status` frames (the queue count) go to every socket.
So the watch combines:

* once a second, which prompt runs and how many wait (the queue depth): from
  `GET /api/jobs?status=in_progress,pending` where ComfyUI has the jobs API (a few hundred bytes:
  ids and states), else from `GET /queue`, which carries every queued prompt's whole graph;
* its own WebSocket: any frame naming the running prompt (seen when a wrapper submits without a
  client id) and the broadcast `status` frames;
* ComfyUI's own console: a sampler prints a tqdm bar that ComfyUI redraws at every step, and the
  daemon reads ComfyUI's output anyway (`ChildProcess.last_output_at`), so a step anywhere shows;
* the wrapper's own figure, when it offers one (this project's wrapper does; it is optional).

A prompt is stalled when it runs and none of these moved for `supervisor.stall_timeout`. A step
longer than that limit (a huge model on a slow card) reads as a stall: set the limit above your
longest step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from api.comfy import ComfyClient, ComfyError, JobState

logger = logging.getLogger(__name__)

POLL_INTERVAL = 1.0


@dataclass(frozen=True)
class ComfyActivity:
    """One reading: the running prompt, the queue behind it, and how fresh the last sign of
    progress is (seconds; None when nothing runs)."""

    running: str | None
    pending: int
    seconds_since_progress: float | None
    evidence: str

    def to_dict(self) -> dict[str, Any]:
        return {"running": self.running, "pending": self.pending,
                "seconds_since_progress": None if self.seconds_since_progress is None
                else round(self.seconds_since_progress, 1), "evidence": self.evidence}


class ComfyWatch:
    """Follows ComfyUI's queue and signs of progress; `stalled()` says when a prompt is stuck.

    ``output_at``: monotonic time ComfyUI last wrote to its console (None: never).
    ``wrapper_progress_at``: monotonic time of the wrapper's last progress, when it reports one.
    """

    def __init__(self, client: ComfyClient, *, output_at: Callable[[], float | None],
                 wrapper_progress_at: Callable[[], float | None] = lambda: None,
                 interval: float = POLL_INTERVAL, jobs_api: bool | None = None) -> None:
        self.client = client
        #: Read the queue through the jobs API: None asks ComfyUI (its capabilities), once per
        #: start; False keeps to `GET /queue` (what a test compares against).
        self._jobs_api = jobs_api
        self._ask_jobs_api = jobs_api is None
        self.output_at = output_at
        self.wrapper_progress_at = wrapper_progress_at
        self.interval = interval
        self.running: str | None = None
        self.pending = 0
        self._progress_at: float | None = None
        self._evidence = ""
        self._task: asyncio.Task | None = None
        self._ws_task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    # --- what the daemon asks -------------------------------------------------------------
    def activity(self) -> ComfyActivity:
        now = time.monotonic()
        self._absorb(now)
        since = None if self.running is None or self._progress_at is None \
            else now - self._progress_at
        return ComfyActivity(self.running, self.pending, since, self._evidence)

    def stalled(self, limit: float) -> str | None:
        """The reason a running prompt counts as stalled, else None."""
        activity = self.activity()
        since = activity.seconds_since_progress
        if since is None or since <= limit:
            return None
        return (f"prompt {activity.running} made no progress for {since:.0f} s (stall limit "
                f"{limit:g} s; last sign: {activity.evidence or 'none'})")

    def reset(self) -> None:
        """Forget the running prompt (after ComfyUI was restarted)."""
        self.running, self.pending, self._progress_at, self._evidence = None, 0, None, ""

    def comfyui_started(self) -> None:
        """A new ComfyUI process: it may be another version, so ask again how to read its queue."""
        if self._ask_jobs_api:
            self._jobs_api = None

    @property
    def source(self) -> str:
        """Where the queue is read from, for the snapshot."""
        return {True: "GET /api/jobs", False: "GET /queue"}.get(self._jobs_api, "not known yet")

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._poll_loop(), name="comfy-watch:queue")
        self._ws_task = asyncio.create_task(self._ws_loop(), name="comfy-watch:ws")

    async def stop(self) -> None:
        for task in (self._task, self._ws_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._session is not None:
            await self._session.close()

    # --- evidence ---------------------------------------------------------------------------
    def _progress(self, at: float, evidence: str) -> None:
        if self._progress_at is None or at > self._progress_at:
            self._progress_at, self._evidence = at, evidence

    def _absorb(self, now: float) -> None:
        """Fold in the passive sources: ComfyUI's console and the wrapper's own figure."""
        if self.running is None:
            return
        output = self.output_at()
        if output is not None:
            self._progress(output, "ComfyUI's console output")
        reported = self.wrapper_progress_at()
        if reported is not None:
            self._progress(min(reported, now), "the wrapper's progress report")

    def _seen_queue(self, running: str | None, pending: int) -> None:
        now = time.monotonic()
        if running != self.running:
            self.running = running
            self._progress_at, self._evidence = None, ""
            if running is not None:
                self._progress(now, "the prompt started")
        self.pending = pending

    async def _poll_loop(self) -> None:
        while True:
            try:
                running, pending = await self._read_queue(max(1.0, self.interval * 2))
            except ComfyError:
                pass  # ComfyUI down or busy: the child's own probes judge that
            else:
                self._seen_queue(running, pending)
            await asyncio.sleep(self.interval)

    async def _read_queue(self, timeout: float) -> tuple[str | None, int]:
        """The running prompt's id and how many wait."""
        if self._jobs_api is None:
            self._jobs_api = (await self.client.capabilities(timeout=timeout)).jobs_api
        if self._jobs_api:
            page = await self.client.jobs(status=(JobState.IN_PROGRESS, JobState.PENDING),
                                          timeout=timeout)
            running = next((j.id for j in page.jobs if j.status is JobState.IN_PROGRESS), None)
            return running, max(0, page.total - (running is not None))
        queue = await self.client.queue(timeout=timeout)
        return (queue.running[0] if queue.running else None), len(queue.pending)

    async def _ws_loop(self) -> None:
        assert self._session is not None
        client_id = f"comfy-worker-watch-{uuid.uuid4().hex[:8]}"
        while True:
            try:
                async with self._session.ws_connect(self.client.ws_url,
                                                    params={"clientId": client_id},
                                                    heartbeat=30) as ws:
                    async for message in ws:
                        if message.type is aiohttp.WSMsgType.TEXT:
                            self._frame(message.data)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            await asyncio.sleep(self.interval)

    def _frame(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            return
        data = frame.get("data") if isinstance(frame, dict) else None
        if not isinstance(data, dict):
            return
        if self.running is not None and data.get("prompt_id") == self.running:
            self._progress(time.monotonic(), f"ComfyUI's {frame.get('type')} frame")
