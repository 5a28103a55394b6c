"""An asyncio client for one ComfyUI server (HTTP + WebSocket).

``run_prompt`` is the main entry point: it connects the WebSocket first (so no
event is missed), posts the prompt with the same client id, follows the events
and, after ComfyUI's final ``executing {node: null}``, reads ``/history/{id}``
for the authoritative result. The WebSocket is a fast path only: when it drops
the client reconnects with the same id and polls ``/history`` + ``/queue``, so a
result is never missed, and a ComfyUI that is gone is reported within
``ClientTimeouts.lost_after`` seconds instead of being waited for.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from . import capabilities as _capabilities
from .capabilities import Capabilities
from .errors import (
    ComfyError,
    ComfyHTTPError,
    ComfyLost,
    ComfyUnreachable,
    PromptRejected,
    PromptVanished,
)
from .models import (
    Cached,
    ClientTimeouts,
    ComfyEvent,
    Executed,
    Executing,
    ExecutionFailure,
    ExecutionStarted,
    Finished,
    JobInfo,
    JobPage,
    JobState,
    OutputFile,
    Progress,
    PromptLookup,
    PromptPlace,
    PromptResult,
    PromptStatus,
    Queued,
    QueueSnapshot,
    SamplingStats,
    Submission,
    SystemStats,
    UploadedFile,
    guess_mimetype,
    parse_node_outputs,
)

logger = logging.getLogger(__name__)

EventCallback = Callable[[ComfyEvent], Awaitable[Any] | None]

# Frames that belong to one prompt. Others (status, feature_flags, custom nodes'
# own messages) say nothing about our prompt and do not count as activity.
_PROMPT_FRAMES = frozenset(
    {
        "execution_start",
        "execution_cached",
        "executing",
        "progress",
        "progress_state",
        "executed",
        "execution_success",
        "execution_error",
        "execution_interrupted",
    }
)

# While ComfyUI does not answer, retry this often (bounded by lost_after).
_RETRY_INTERVAL = 0.1
# The history entry is written before the final frame is sent; these retries
# only cover a server that does it the other way round.
_HISTORY_AFTER_FINAL_RETRIES = (0.02, 0.05, 0.1, 0.2, 0.3)
# Exponential smoothing of the per-step duration behind Progress.its_per_second.
_ITS_SMOOTHING = 0.3
# Where a job of the jobs API is, as a look-up tells it.
_PLACE_OF_JOB = {JobState.PENDING: PromptPlace.QUEUED, JobState.IN_PROGRESS: PromptPlace.RUNNING,
                 JobState.COMPLETED: PromptPlace.DONE, JobState.FAILED: PromptPlace.DONE,
                 JobState.CANCELLED: PromptPlace.DONE}


#: With ``defer_closes``, more finished prompts' sockets than this are closed without waiting
#: for the owner.
_MAX_DEFERRED_CLOSES = 16


def new_prompt_id() -> str:
    """A prompt id every ComfyUI accepts: a canonical UUID (lowercase, hyphenated)."""
    return str(uuid.uuid4())


class ComfyClient:
    """Talks to one ComfyUI at ``base_url`` (e.g. ``http://127.0.0.1:8188``).

    ``output_dir``/``temp_dir`` are ComfyUI's folders as seen from this process;
    when given, every :class:`OutputFile` gets an absolute ``local_path``.
    One aiohttp session is used for everything; pass ``session`` to share yours
    (it is then not closed by :meth:`close`).

    A prompt's WebSocket is closed in the background once its result is known. With
    ``defer_closes`` its owner says when, by calling :meth:`close_deferred`: a server that
    answers its own client from another task than the one that ran the prompt (the wrapper)
    does so once the answer is written, so the close handshake never runs before it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        output_dir: Path | None = None,
        temp_dir: Path | None = None,
        session: aiohttp.ClientSession | None = None,
        timeouts: ClientTimeouts = ClientTimeouts(),
        defer_closes: bool = False,
    ) -> None:
        base_url = base_url.rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url
        self.ws_url = "ws" + base_url[len("http") :] + "/ws"
        self.output_dir = Path(output_dir).absolute() if output_dir is not None else None
        self.temp_dir = Path(temp_dir).absolute() if temp_dir is not None else None
        self.timeouts = timeouts
        self._session = session
        self._owns_session = session is None
        self._sockets: set[aiohttp.ClientWebSocketResponse[bool]] = set()
        self._closing: set[asyncio.Task[None]] = set()  # sockets closing in the background
        self._defer_closes = defer_closes
        self._deferred: list[aiohttp.ClientWebSocketResponse[bool]] = []  # done, not closing yet
        self._closed = False
        # What this ComfyUI can do, learned once per ComfyUI start (forgotten when it is lost).
        self._capabilities: Capabilities | None = None
        self._learning: asyncio.Lock | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> ComfyClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close open WebSockets and the session (if this client made it)."""
        self._closed = True
        self.close_deferred()
        for ws in list(self._sockets):
            await ws.close()
        self._sockets.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ComfyError("this ComfyClient is closed; make a new one")
        if self._session is None:
            # Created lazily: a ClientSession must be made inside the running loop.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeouts.request, connect=self.timeouts.connect)
            )
        return self._session

    # ------------------------------------------------------------------ prompts

    async def run_prompt(
        self,
        graph: dict[str, Any],
        *,
        prompt_id: str | None = None,
        extra_data: dict[str, Any] | None = None,
        on_event: EventCallback | None = None,
    ) -> PromptResult:
        """Submit ``graph`` and wait for its result.

        Raises :class:`ComfyUnreachable` (nothing was submitted),
        :class:`PromptRejected` (ComfyUI's 400), :class:`ComfyLost`,
        :class:`PromptVanished`. A failed or interrupted execution is not an
        exception: it is ``result.status``. Cancelling the call stops following
        the prompt but does not interrupt it in ComfyUI (see :meth:`cancel`).
        """
        client_id = uuid.uuid4().hex
        ws, early = await self._open_ws(client_id, self.timeouts.connect, wait_first_frame=True)
        try:
            submission = await self.submit(graph, prompt_id=prompt_id, client_id=client_id, extra_data=extra_data)
            follower = _Follower(
                self, submission.prompt_id, client_id, graph=graph, on_event=on_event, submission=submission
            )
            await follower.emit(Queued(submission.prompt_id, submission.number, submission.node_errors))
        except BaseException:
            await self._close_ws(ws)
            raise
        return await follower.run(ws, early, poll_first=False)

    async def submit(
        self,
        graph: dict[str, Any],
        *,
        prompt_id: str | None = None,
        client_id: str | None = None,
        extra_data: dict[str, Any] | None = None,
    ) -> Submission:
        """``POST /prompt``. Without a ``client_id`` ComfyUI sends no events for it.

        The prompt id is chosen before posting (``prompt_id``, else a new canonical UUID), so
        an answer that is lost (no answer within ``timeouts.submit``, or the connection dropped
        after the request was sent) is settled by one look-up: ComfyUI has the prompt (it is
        followed, never posted again) or it has not (:class:`ComfyUnreachable`: nothing was
        submitted)."""
        if not isinstance(graph, dict):
            raise TypeError(f"graph must be a dict in ComfyUI's API format, got {type(graph).__name__}")
        prompt_id = prompt_id or new_prompt_id()
        body: dict[str, Any] = {"prompt": graph, "prompt_id": prompt_id}
        if client_id:
            body["client_id"] = client_id
        if extra_data:
            body["extra_data"] = extra_data
        try:
            status, payload, text = await self._request("POST", "/prompt", json=body,
                                                        timeout=self.timeouts.submit, sent=True)
        except _AnswerLost as lost:
            return await self._settle_lost_answer(prompt_id, client_id, lost.reason)
        if status == 200 and isinstance(payload, dict) and payload.get("prompt_id"):
            node_errors = payload.get("node_errors") or {}
            if node_errors:
                logger.warning("prompt %s accepted with node errors: %s", payload["prompt_id"], node_errors)
            return Submission(
                prompt_id=str(payload["prompt_id"]),
                number=payload.get("number", 0),
                node_errors=node_errors,
                client_id=client_id,
            )
        if 400 <= status < 500 and isinstance(payload, dict):
            raise PromptRejected(status, payload)
        raise ComfyHTTPError("POST", "/prompt", status, text)

    async def _settle_lost_answer(self, prompt_id: str, client_id: str | None,
                                  reason: str) -> Submission:
        found = await self.lookup(prompt_id)
        if found.place is PromptPlace.UNKNOWN:
            raise ComfyUnreachable(f"POST /prompt: {reason}, and ComfyUI has no prompt {prompt_id}: "
                                   "nothing was submitted")
        logger.warning("prompt %s: POST /prompt %s, but ComfyUI has it (%s); following it", prompt_id,
                       reason, found.place.value)
        return Submission(prompt_id=prompt_id, number=None, node_errors={}, client_id=client_id)

    async def wait(
        self,
        prompt_id: str,
        *,
        client_id: str | None = None,
        graph: dict[str, Any] | None = None,
        on_event: EventCallback | None = None,
    ) -> PromptResult:
        """Wait for a prompt that was submitted with :meth:`submit`.

        Pass the ``client_id`` it was submitted with to receive its events from
        now on; events sent before this call are lost, but the result comes from
        the history either way. ``graph`` only helps to tell samplers apart in
        :class:`SamplingStats`.
        """
        follower = _Follower(self, prompt_id, client_id or uuid.uuid4().hex, graph=graph, on_event=on_event)
        try:
            ws, early = await self._open_ws(follower.client_id, self.timeouts.connect, wait_first_frame=False)
        except ComfyUnreachable as exc:
            # Submitted earlier, so this is "lost" unless a poll still reaches ComfyUI.
            logger.info("prompt %s: WebSocket connect failed (%s); polling", prompt_id, exc.reason)
            follower.note_trouble_start()
            ws, early = None, []
        return await follower.run(ws, early, poll_first=True)

    async def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt``: stop ``prompt_id`` if it is the one running (or whatever runs).

        ComfyUI ignores the request for a prompt that is only queued; use
        :meth:`cancel` to cover both cases.
        """
        body = {"prompt_id": prompt_id} if prompt_id else {}
        await self._expect_ok("POST", "/interrupt", json=body)

    async def delete_queued(self, prompt_ids: list[str]) -> None:
        """Remove prompts that wait in the queue (running ones are not touched)."""
        await self._expect_ok("POST", "/queue", json={"delete": list(prompt_ids)})

    async def cancel(self, prompt_id: str) -> None:
        """Drop the prompt if it is queued, interrupt it if it runs.

        Through ``POST /api/jobs/{id}/cancel`` where ComfyUI has the jobs API (one atomic step);
        else ``POST /queue {delete}`` then ``POST /interrupt``: deleting first closes the gap
        where it starts between the two calls.
        """
        if (await self.capabilities()).jobs_api:
            await self.cancel_job(prompt_id)
            return
        await self.delete_queued([prompt_id])
        await self.interrupt(prompt_id)

    # ------------------------------------------------------------------ what ComfyUI is

    async def capabilities(self, *, timeout: float = 5.0) -> Capabilities:
        """What this ComfyUI is and can do (learned on first use, and again after it was lost)."""
        if self._capabilities is not None:
            return self._capabilities
        if self._learning is None:
            self._learning = asyncio.Lock()
        async with self._learning:
            if self._capabilities is None:
                learned = await _capabilities.learn(self, timeout)
                logger.info("%s at %s", learned.describe(), self.base_url)
                self._capabilities = learned
            return self._capabilities

    def forget_capabilities(self) -> None:
        """ComfyUI was lost (it may come back as another version): learn it again when asked."""
        self._capabilities = None

    async def features(self, *, timeout: float | None = None) -> dict[str, Any]:
        """``GET /features``: the server's feature flags."""
        payload = await self._get_json("/features", timeout=timeout)
        if not isinstance(payload, dict):
            raise ComfyHTTPError("GET", "/features", 200, str(payload)[:300])
        return payload

    async def has_jobs_api(self, *, timeout: float | None = None) -> bool:
        """Whether ``GET /api/jobs`` exists (it answers a list; an older ComfyUI 404)."""
        status, payload, text = await self._request("GET", "/api/jobs", params={"limit": "1"},
                                                    timeout=timeout)
        if status == 200 and isinstance(payload, dict) and "jobs" in payload:
            return True
        if status == 404:
            return False
        raise ComfyHTTPError("GET", "/api/jobs", status, text)

    async def job(self, prompt_id: str, *, timeout: float | None = None) -> JobInfo | None:
        """``GET /api/jobs/{id}``; None when ComfyUI has no such job."""
        path = f"/api/jobs/{quote(prompt_id, safe='')}"
        status, payload, text = await self._request("GET", path, timeout=timeout)
        if status == 404 and isinstance(payload, dict):  # {"error": "Job not found"}
            return None
        if status != 200 or not isinstance(payload, dict):
            raise ComfyHTTPError("GET", path, status, text)
        try:
            return JobInfo.from_json(payload)
        except ValueError:
            raise ComfyHTTPError("GET", path, status, text) from None

    async def cancel_job(self, prompt_id: str) -> bool:
        """``POST /api/jobs/{id}/cancel``: True when a queued job was dropped or a running one
        interrupted; False for a finished or unknown one."""
        path = f"/api/jobs/{quote(prompt_id, safe='')}/cancel"
        status, payload, text = await self._request("POST", path)
        if status != 200 or not isinstance(payload, dict):
            raise ComfyHTTPError("POST", path, status, text)
        return bool(payload.get("cancelled"))

    async def jobs(self, *, status: Iterable[JobState | str] | None = None, limit: int | None = None,
                   offset: int | None = None, sort_by: str | None = None, sort_order: str | None = None,
                   workflow_id: str | None = None, timeout: float | None = None) -> JobPage:
        """``GET /api/jobs``: ComfyUI's jobs, e.g. ``status=[JobState.PENDING, JobState.IN_PROGRESS]``."""
        params: dict[str, str] = {}
        if status is not None:
            params["status"] = ",".join(JobState(s).value for s in status)
        for key, value in (("limit", limit), ("offset", offset), ("sort_by", sort_by),
                           ("sort_order", sort_order), ("workflow_id", workflow_id)):
            if value is not None:
                params[key] = str(value)
        payload = await self._get_json("/api/jobs", timeout=timeout, params=params)
        raw_jobs = payload.get("jobs") if isinstance(payload, dict) else None
        if not isinstance(raw_jobs, list):
            raise ComfyHTTPError("GET", "/api/jobs", 200, str(payload)[:300])
        page = payload.get("pagination") or {}
        jobs = [JobInfo.from_json(item) for item in raw_jobs if isinstance(item, dict)]
        return JobPage(jobs=jobs, total=int(page.get("total", len(jobs))),
                       has_more=bool(page.get("has_more", False)), offset=int(page.get("offset", 0)),
                       limit=page.get("limit") if isinstance(page.get("limit"), int) else None)

    async def lookup(self, prompt_id: str, *, timeout: float | None = None) -> PromptLookup:
        """Where the prompt is now, by one look-up: ``GET /api/jobs/{id}`` where ComfyUI has the
        jobs API, else ``/history/{id}`` and ``/queue`` (and the history once more, for a prompt
        that finished between the two: ComfyUI moves it from one to the other in one step)."""
        if (await self.capabilities(timeout=timeout or 5.0)).jobs_api:
            job = await self.job(prompt_id, timeout=timeout)
            return PromptLookup(_PLACE_OF_JOB[job.status] if job else PromptPlace.UNKNOWN)
        entry = await self.history(prompt_id, timeout=timeout)
        if entry is None:
            snapshot = await self.queue(timeout=timeout)
            if prompt_id in snapshot.running:
                return PromptLookup(PromptPlace.RUNNING)
            if prompt_id in snapshot.pending:
                return PromptLookup(PromptPlace.QUEUED)
            entry = await self.history(prompt_id, timeout=timeout)
        return PromptLookup(PromptPlace.DONE, entry) if entry is not None else PromptLookup(PromptPlace.UNKNOWN)

    async def queue(self, *, timeout: float | None = None) -> QueueSnapshot:
        payload = await self._get_json("/queue", timeout=timeout)
        running = [str(item[1]) for item in payload.get("queue_running") or [] if _is_queue_item(item)]
        pending_items = [item for item in payload.get("queue_pending") or [] if _is_queue_item(item)]
        # ComfyUI sends its heap as is; sort by number to get execution order.
        pending_items.sort(key=lambda item: item[0] if isinstance(item[0], (int, float)) else 0)
        return QueueSnapshot(running=running, pending=[str(item[1]) for item in pending_items])

    async def history(self, prompt_id: str, *, timeout: float | None = None) -> dict[str, Any] | None:
        """The raw ``/history/{id}`` entry, or None while the prompt is not finished."""
        payload = await self._get_json(f"/history/{quote(prompt_id, safe='')}", timeout=timeout)
        entry = payload.get(prompt_id)
        return entry if isinstance(entry, dict) else None

    async def view(self, output: OutputFile) -> bytes:
        """The bytes of an output file, through ``GET /view`` (for a remote ComfyUI)."""
        status, _payload, body = await self._request("GET", "/view", params=output.view_params, raw=True)
        if status != 200:
            raise ComfyHTTPError("GET", "/view", status, body.decode("utf-8", "replace"))
        return body

    # ------------------------------------------------------------------ other endpoints

    async def upload_image(
        self,
        data: bytes,
        filename: str,
        *,
        subfolder: str = "",
        overwrite: bool = False,
        image_type: str = "input",
    ) -> UploadedFile:
        """``POST /upload/image``. ComfyUI may rename the file to avoid a clash."""
        form = aiohttp.FormData()
        form.add_field("image", data, filename=filename, content_type=guess_mimetype(filename))
        form.add_field("type", image_type)
        form.add_field("subfolder", subfolder)
        form.add_field("overwrite", "true" if overwrite else "false")
        status, payload, text = await self._request("POST", "/upload/image", data=form)
        if status != 200 or not isinstance(payload, dict) or "name" not in payload:
            raise ComfyHTTPError("POST", "/upload/image", status, text)
        return UploadedFile(
            name=str(payload["name"]),
            subfolder=str(payload.get("subfolder") or ""),
            type=str(payload.get("type") or image_type),
        )

    async def system_stats(self, *, timeout: float | None = None) -> SystemStats:
        return SystemStats.from_json(await self._get_json("/system_stats", timeout=timeout))

    async def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        """``GET /object_info[/{class}]`` as ComfyUI sends it: ``{class: info}``
        (empty for an unknown class)."""
        path = "/object_info" if node_class is None else f"/object_info/{quote(node_class, safe='')}"
        return await self._get_json(path)

    async def list_checkpoints(self) -> list[str]:
        """Checkpoint file names ComfyUI can load (as ``CheckpointLoaderSimple`` accepts them)."""
        status, payload, _text = await self._request("GET", "/models/checkpoints")
        if status == 200 and isinstance(payload, list):
            return [str(name) for name in payload]
        # Older servers lack /models/{folder}; the loader's input list says the same.
        info = (await self.object_info("CheckpointLoaderSimple")).get("CheckpointLoaderSimple") or {}
        spec = ((info.get("input") or {}).get("required") or {}).get("ckpt_name") or []
        if spec and isinstance(spec[0], list):
            return [str(name) for name in spec[0]]
        if len(spec) > 1 and isinstance(spec[1], dict):  # ["COMBO", {"options": [...]}]
            return [str(name) for name in spec[1].get("options") or []]
        return []

    async def checkpoint_installed(self, name: str) -> bool:
        wanted = name.replace("\\", "/")
        return any(item.replace("\\", "/") == wanted for item in await self.list_checkpoints())

    async def probe(self, timeout: float) -> None:
        """Readiness/hang check: ``GET /system_stats`` answers 200 and a WebSocket
        connects and receives its first frame, all within ``timeout`` seconds.

        Raises :class:`ComfyUnreachable` whose ``reason`` says which part failed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        stage = "GET /system_stats"
        # Each step is bounded by its own timeout. A second wait_for around them raced the
        # inner one and, when the caller gave up at that moment, left an exception unretrieved.
        try:
            status, payload, text = await self._request("GET", "/system_stats", timeout=timeout)
            if status != 200 or not isinstance(payload, dict) or "system" not in payload:
                raise ComfyUnreachable(f"GET /system_stats answered HTTP {status}: {text[:200]!r}")
            stage = "WebSocket /ws"
            remaining = max(0.01, deadline - loop.time())
            ws, _early = await self._open_ws(f"probe-{uuid.uuid4().hex}", remaining,
                                             wait_first_frame=True, require_frame=True)
            await self._close_ws(ws)
        except asyncio.TimeoutError:
            raise ComfyUnreachable(f"{stage}: no answer within {timeout:.1f}s") from None

    # ------------------------------------------------------------------ transport

    async def _request(
        self,
        method: str,
        path: str,
        *,
        timeout: float | None = None,
        raw: bool = False,
        sent: bool = False,
        **kwargs: Any,
    ) -> tuple[int, Any, Any]:
        """One HTTP request. Returns (status, parsed JSON or None, text or bytes).

        Transport failures become :class:`ComfyUnreachable` with a readable reason; with
        ``sent``, a failure once the connection was made (the request may have reached
        ComfyUI) is ``_AnswerLost`` instead.
        """
        session = self._get_session()
        total = timeout if timeout is not None else self.timeouts.request
        client_timeout = aiohttp.ClientTimeout(total=total, connect=min(self.timeouts.connect, total))
        try:
            async with session.request(method, self.base_url + path, timeout=client_timeout, **kwargs) as resp:
                body = await resp.read()
                status = resp.status
        except aiohttp.ConnectionTimeoutError:
            raise ComfyUnreachable(f"{method} {path}: cannot connect to {self.base_url} within "
                                   f"{min(self.timeouts.connect, total):.2f}s") from None
        except asyncio.TimeoutError:
            if sent:
                raise _AnswerLost(f"had no answer within {total:.2f}s") from None
            raise ComfyUnreachable(f"{method} {path}: no answer within {total:.2f}s") from None
        except aiohttp.ClientConnectorError as exc:
            self.forget_capabilities()  # nothing listens: what comes back may be another ComfyUI
            raise ComfyUnreachable(f"{method} {path}: cannot connect to {self.base_url}: {_os_reason(exc)}") from None
        except aiohttp.ClientError as exc:
            if sent:
                raise _AnswerLost(f"lost its answer ({type(exc).__name__}: {exc})") from None
            raise ComfyUnreachable(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if raw:
            return status, None, body
        text = body.decode("utf-8", "replace")
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = None
        return status, payload, text

    async def _get_json(self, path: str, *, timeout: float | None = None,
                        params: dict[str, str] | None = None) -> Any:
        status, payload, text = await self._request("GET", path, timeout=timeout, params=params)
        if status != 200 or payload is None:
            raise ComfyHTTPError("GET", path, status, text)
        return payload

    async def _expect_ok(self, method: str, path: str, **kwargs: Any) -> None:
        status, _payload, text = await self._request(method, path, **kwargs)
        if status != 200:
            raise ComfyHTTPError(method, path, status, text)

    async def _open_ws(
        self,
        client_id: str,
        timeout: float,
        *,
        wait_first_frame: bool,
        require_frame: bool = False,
    ) -> tuple[aiohttp.ClientWebSocketResponse[bool], list[Any]]:
        """Connect ``/ws?clientId=...``.

        With ``wait_first_frame`` it also waits (within ``timeout``) for the
        ``status`` frame ComfyUI sends once the socket is registered: a prompt
        posted before that could emit events to nobody. Frames read that way
        are returned so the caller can process them.
        """
        session = self._get_session()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            ws = await asyncio.wait_for(
                session.ws_connect(self.ws_url, params={"clientId": client_id}, max_msg_size=0, autoping=True),
                timeout,
            )
        except asyncio.TimeoutError:
            raise ComfyUnreachable(f"WebSocket {self.ws_url}: no handshake within {timeout:.2f}s") from None
        except aiohttp.WSServerHandshakeError as exc:
            raise ComfyUnreachable(f"WebSocket {self.ws_url}: handshake refused (HTTP {exc.status})") from None
        except aiohttp.ClientConnectorError as exc:
            raise ComfyUnreachable(f"WebSocket {self.ws_url}: cannot connect: {_os_reason(exc)}") from None
        except aiohttp.ClientError as exc:
            raise ComfyUnreachable(f"WebSocket {self.ws_url}: {type(exc).__name__}: {exc}") from None
        self._sockets.add(ws)
        early: list[Any] = []
        if wait_first_frame:
            try:
                msg = await ws.receive(timeout=max(0.01, deadline - loop.time()))
            except asyncio.TimeoutError:
                if require_frame:
                    await self._close_ws(ws)
                    raise ComfyUnreachable(
                        f"WebSocket {self.ws_url}: connected but no frame within {timeout:.2f}s"
                    ) from None
                logger.debug("WebSocket %s sent no status frame within %.2fs; going on", client_id, timeout)
            else:
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    early.append(msg)
                else:
                    await self._close_ws(ws)
                    raise ComfyUnreachable(f"WebSocket {self.ws_url}: closed right after connecting ({msg.type.name})")
        return ws, early

    def _close_ws_later(self, ws: aiohttp.ClientWebSocketResponse[bool] | None) -> None:
        """Close ``ws`` in a task of its own (:meth:`close` waits for it); with
        ``defer_closes``, once :meth:`close_deferred` is called (or a few are waiting)."""
        if ws is None:
            return
        self._sockets.discard(ws)
        if self._defer_closes:
            self._deferred.append(ws)
            if len(self._deferred) > _MAX_DEFERRED_CLOSES:  # an owner that forgot: no pile-up
                self.close_deferred()
            return
        self._start_closing(ws)

    def close_deferred(self) -> None:
        """Start closing the WebSockets of the prompts that finished (see ``defer_closes``)."""
        deferred, self._deferred = self._deferred, []
        for ws in deferred:
            self._start_closing(ws)

    def _start_closing(self, ws: aiohttp.ClientWebSocketResponse[bool]) -> None:
        task = asyncio.get_running_loop().create_task(self._close_ws(ws))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_ws(self, ws: aiohttp.ClientWebSocketResponse[bool] | None) -> None:
        if ws is None:
            return
        self._sockets.discard(ws)
        try:
            await asyncio.wait_for(ws.close(), self.timeouts.connect)
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
            pass


class _AnswerLost(Exception):
    """A request that may have reached ComfyUI got no answer (see ``_request(sent=True)``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Follower:
    """Follows one prompt to its end over the WebSocket, with HTTP polls as a safety net."""

    def __init__(
        self,
        client: ComfyClient,
        prompt_id: str,
        client_id: str,
        *,
        graph: dict[str, Any] | None,
        on_event: EventCallback | None,
        submission: Submission | None = None,
    ) -> None:
        self.client = client
        self.timeouts = client.timeouts
        self.prompt_id = prompt_id
        self.client_id = client_id
        self.on_event = on_event
        self.submission = submission
        self.queued_at = time.time() if submission is not None else None
        self.ws: aiohttp.ClientWebSocketResponse[bool] | None = None
        self.progress = _ProgressMeter(graph or {})
        # What the WebSocket told us; used when the history cannot be read.
        self.ws_outputs: dict[str, Any] = {}
        self.ws_failure: dict[str, Any] | None = None
        self.ws_interrupted: dict[str, Any] | None = None
        self.ws_success = False
        self.started_at: float | None = None
        self.finished_at: float | None = None
        # Time the current run of failed contacts began (None: ComfyUI answers).
        self.trouble_since: float | None = None
        self.polling = False  # the WebSocket went quiet; polls run every poll_interval

    # -------------------------------------------------------------- main loop

    async def run(
        self,
        ws: aiohttp.ClientWebSocketResponse[bool] | None,
        early: Iterable[Any],
        *,
        poll_first: bool,
    ) -> PromptResult:
        loop = asyncio.get_running_loop()
        self.ws = ws
        try:
            for msg in early:
                if msg.type is aiohttp.WSMsgType.TEXT and (await self._on_text(msg.data))[1]:
                    return await self._finish_after_final_frame()
            next_poll = loop.time() if poll_first else loop.time() + self.timeouts.ws_idle
            while True:
                if self.ws is None:
                    if await self._reconnect():
                        # Frames may have been missed while disconnected; and
                        # ComfyUI can drop a fresh socket that raced the old one's
                        # cleanup, so poll until our prompt's frames flow again.
                        next_poll = loop.time()
                if loop.time() >= next_poll:
                    result = await self._poll()
                    if result is not None:
                        return await self._deliver(result)
                    next_poll = loop.time() + (
                        self.timeouts.poll_interval if self.trouble_since is None else _RETRY_INTERVAL
                    )
                if self.ws is None:
                    wait = _RETRY_INTERVAL if self.trouble_since is not None else self.timeouts.poll_interval
                    await asyncio.sleep(max(0.0, min(wait, next_poll - loop.time())))
                    continue
                try:
                    # A zero timeout would mean "wait forever" to aiohttp.
                    msg = await self.ws.receive(timeout=max(0.001, next_poll - loop.time()))
                except asyncio.TimeoutError:
                    if not self.polling:
                        self.polling = True
                        logger.info(
                            "prompt %s: no frame about it for %.1fs; polling /history every %.1fs",
                            self.prompt_id,
                            self.timeouts.ws_idle,
                            self.timeouts.poll_interval,
                        )
                    continue
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self._contact_ok()
                    relevant, final = await self._on_text(msg.data)
                    if final:
                        return await self._finish_after_final_frame()
                    if relevant:
                        self.polling = False
                        next_poll = loop.time() + self.timeouts.ws_idle
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    # Previews for our client id: activity, but nothing we need.
                    self._contact_ok()
                    self.polling = False
                    next_poll = loop.time() + self.timeouts.ws_idle
                else:
                    reason = f"WebSocket closed ({msg.type.name}{': ' + str(msg.extra) if msg.extra else ''})"
                    logger.warning("prompt %s: %s; reconnecting", self.prompt_id, reason)
                    await self.client._close_ws(self.ws)
                    self.ws = None
                    self._contact_failed(reason)
                    next_poll = loop.time()
        finally:
            # The answer is known: the close handshake need not hold it up.
            self.client._close_ws_later(self.ws)
            self.ws = None

    # -------------------------------------------------------------- contact bookkeeping

    def note_trouble_start(self) -> None:
        if self.trouble_since is None:
            self.trouble_since = asyncio.get_running_loop().time()

    def _contact_ok(self) -> None:
        if self.trouble_since is not None:
            logger.info("prompt %s: ComfyUI answers again", self.prompt_id)
        self.trouble_since = None

    def _contact_failed(self, reason: str) -> None:
        """Record a failed contact; raise ComfyLost once failures lasted lost_after."""
        now = asyncio.get_running_loop().time()
        if self.trouble_since is None:
            self.trouble_since = now
        if now - self.trouble_since >= self.timeouts.lost_after:
            raise ComfyLost(
                f"ComfyUI at {self.client.base_url} is gone while prompt {self.prompt_id} was in flight "
                f"(no answer for {now - self.trouble_since:.1f}s; last error: {reason})",
                prompt_id=self.prompt_id,
            )

    def _attempt_timeout(self, normal: float) -> float:
        """While contacts fail, no single attempt may outlast the lost_after budget."""
        if self.trouble_since is None:
            return normal
        left = self.trouble_since + self.timeouts.lost_after - asyncio.get_running_loop().time()
        return max(0.05, min(normal, left))

    async def _reconnect(self) -> bool:
        try:
            ws, _early = await self.client._open_ws(
                self.client_id, self._attempt_timeout(self.timeouts.connect), wait_first_frame=False
            )
        except ComfyUnreachable as exc:
            self._contact_failed(exc.reason)
            return False
        self.ws = ws
        self._contact_ok()
        logger.info("prompt %s: WebSocket reconnected", self.prompt_id)
        return True

    # -------------------------------------------------------------- polling

    async def _poll(self) -> PromptResult | None:
        """One look-up (:meth:`ComfyClient.lookup`): a result, None (still queued/running or
        ComfyUI did not answer), or PromptVanished."""
        client = self.client
        try:
            timeout = self._attempt_timeout(self.timeouts.request)
            found = await client.lookup(self.prompt_id, timeout=timeout)
            self._contact_ok()
            if found.place is PromptPlace.DONE:
                entry = found.history
                if entry is None:  # the jobs API told: the history holds the whole entry
                    entry = await client.history(self.prompt_id, timeout=timeout)
                return self._build_result(entry)
        except ComfyUnreachable as exc:
            self._contact_failed(exc.reason)
            return None
        except ComfyHTTPError as exc:
            logger.warning("prompt %s: poll failed: %s", self.prompt_id, exc)
            return None
        if found.place is PromptPlace.UNKNOWN:
            raise PromptVanished(self.prompt_id)
        return None

    async def _finish_after_final_frame(self) -> PromptResult:
        entry = None
        for delay in (0.0, *_HISTORY_AFTER_FINAL_RETRIES):
            if delay:
                await asyncio.sleep(delay)
            try:
                entry = await self.client.history(self.prompt_id)
            except (ComfyUnreachable, ComfyHTTPError) as exc:
                logger.warning(
                    "prompt %s finished but its history could not be read (%s); using WebSocket events",
                    self.prompt_id,
                    exc,
                )
                break
            if entry is not None:
                break
        else:
            logger.warning("prompt %s finished but is not in the history; using WebSocket events", self.prompt_id)
        return await self._deliver(self._build_result(entry))

    async def _deliver(self, result: PromptResult) -> PromptResult:
        await self.emit(Finished(self.prompt_id, result))
        return result

    # -------------------------------------------------------------- frames

    async def _on_text(self, text: str) -> tuple[bool, bool]:
        """Handle one JSON frame; returns (about our prompt, final frame)."""
        try:
            frame = json.loads(text)
        except ValueError:
            logger.debug("prompt %s: ignoring a frame that is not JSON", self.prompt_id)
            return False, False
        if not isinstance(frame, dict):
            return False, False
        kind = frame.get("type")
        data = frame.get("data")
        if kind not in _PROMPT_FRAMES or not isinstance(data, dict):
            return False, False
        frame_prompt = data.get("prompt_id")
        # Frames without a prompt_id (the 'executing' replayed on reconnect)
        # reach us only through our own client id, so they are ours.
        if frame_prompt is not None and frame_prompt != self.prompt_id:
            return False, False

        now = time.time()
        if kind == "execution_start":
            self.started_at = _timestamp(data, now)
            await self.emit(ExecutionStarted(self.prompt_id))
        elif kind == "execution_cached":
            await self.emit(Cached(self.prompt_id, [str(node) for node in data.get("nodes") or []]))
        elif kind == "executing":
            node = data.get("node")
            if node is None:
                return True, True
            self.progress.node_started(str(node))
            await self.emit(Executing(self.prompt_id, str(node)))
        elif kind == "progress":
            node = data.get("node")
            node = None if node is None else str(node)
            value = _number(data.get("value"))
            maximum = _number(data.get("max"))
            its, elapsed = self.progress.update(node, value)
            await self.emit(Progress(self.prompt_id, node, value, maximum, its, elapsed))
        elif kind == "executed":
            node = str(data.get("node"))
            raw_output = data.get("output")
            output: dict[str, Any] = raw_output if isinstance(raw_output, dict) else {}
            self.ws_outputs[node] = output
            await self.emit(Executed(self.prompt_id, node, output))
        elif kind == "execution_success":
            self.ws_success = True
            self.finished_at = _timestamp(data, now)
        elif kind == "execution_error":
            self.ws_failure = data
            self.finished_at = _timestamp(data, now)
        elif kind == "execution_interrupted":
            self.ws_interrupted = data
            self.finished_at = _timestamp(data, now)
        return True, False

    async def emit(self, event: ComfyEvent) -> None:
        if self.on_event is None:
            return
        outcome = self.on_event(event)
        if inspect.isawaitable(outcome):
            await outcome

    # -------------------------------------------------------------- result

    def _build_result(self, entry: dict[str, Any] | None) -> PromptResult:
        """Combine the history entry (authoritative) with what the WebSocket said."""
        entry = entry or {}
        raw_status = entry.get("status")
        status_block: dict[str, Any] = raw_status if isinstance(raw_status, dict) else {}
        messages: list[tuple[str, dict[str, Any]]] = []
        for item in status_block.get("messages") or []:
            if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], dict):
                messages.append((str(item[0]), item[1]))
        by_kind = {kind: data for kind, data in messages}

        failure: dict[str, Any] | None = by_kind.get("execution_error") or self.ws_failure
        interrupted: dict[str, Any] | None = by_kind.get("execution_interrupted") or self.ws_interrupted
        if interrupted is not None:
            status = PromptStatus.INTERRUPTED
        elif failure is not None:
            status = PromptStatus.FAILED
        elif status_block.get("status_str") == "error":
            # An error without its message (a server that dropped it): still a failure.
            status = PromptStatus.FAILED
            failure = {"exception_type": "unknown", "exception_message": "ComfyUI reported an error"}
        else:
            status = PromptStatus.SUCCESS

        outputs = entry.get("outputs") if isinstance(entry.get("outputs"), dict) else None
        parsed = parse_node_outputs(
            outputs if outputs is not None else self.ws_outputs,
            output_dir=self.client.output_dir,
            temp_dir=self.client.temp_dir,
        )

        now = time.time()
        started_at = self.started_at
        if "execution_start" in by_kind:
            started_at = _timestamp(by_kind["execution_start"], started_at or now)
        finished_at = self.finished_at
        for kind in ("execution_success", "execution_error", "execution_interrupted"):
            if kind in by_kind:
                finished_at = _timestamp(by_kind[kind], finished_at or now)
        return PromptResult(
            prompt_id=self.prompt_id,
            status=status,
            outputs=parsed.files,
            error=ExecutionFailure.from_message(failure) if status is PromptStatus.FAILED and failure else None,
            sampling=self.progress.stats(),
            texts=parsed.texts,
            previews=parsed.previews,
            node_errors=self.submission.node_errors if self.submission else {},
            interrupted_node=_opt_str(interrupted.get("node_id")) if interrupted else None,
            number=self.submission.number if self.submission else None,
            queued_at=self.queued_at,
            started_at=started_at,
            finished_at=finished_at if finished_at is not None else now,
            history=entry,
            messages=messages,
        )


class _NodeProgress:
    """Step timing of one node; a value that goes down starts a new run."""

    def __init__(self, started: float | None) -> None:
        self.started = started
        self.steps = 0.0  # steps completed in finished runs
        self.timed_steps = 0.0  # steps between first and last frame, finished runs
        self.timed_seconds = 0.0
        self.first: tuple[float, float] | None = None  # (time, value) of the current run
        self.last: tuple[float, float] | None = None
        self.step_seconds: float | None = None  # smoothed

    def update(self, now: float, value: float) -> None:
        if self.last is not None and value < self.last[1]:
            self._close_run()
        if self.last is None:
            self.first = self.last = (now, value)
            self.step_seconds = None
            return
        dv = value - self.last[1]
        if dv <= 0:
            return  # a repeated frame carries no timing
        per_step = (now - self.last[0]) / dv
        if self.step_seconds is None:
            self.step_seconds = per_step
        else:
            self.step_seconds = _ITS_SMOOTHING * per_step + (1 - _ITS_SMOOTHING) * self.step_seconds
        self.last = (now, value)

    def _close_run(self) -> None:
        assert self.first is not None and self.last is not None
        self.steps += self.last[1]
        self.timed_steps += self.last[1] - self.first[1]
        self.timed_seconds += self.last[0] - self.first[0]
        self.first = self.last = None

    def totals(self) -> tuple[float, float, float]:
        steps, timed_steps, timed_seconds = self.steps, self.timed_steps, self.timed_seconds
        if self.first is not None and self.last is not None:
            steps += self.last[1]
            timed_steps += self.last[1] - self.first[1]
            timed_seconds += self.last[0] - self.first[0]
        return steps, timed_steps, timed_seconds


class _ProgressMeter:
    """Turns ``progress`` frames into it/s, per node and for the whole prompt."""

    def __init__(self, graph: dict[str, Any]) -> None:
        self.graph = graph
        self.nodes: dict[str | None, _NodeProgress] = {}
        self.started: dict[str, float] = {}

    def node_started(self, node: str) -> None:
        self.started[node] = time.monotonic()

    def update(self, node: str | None, value: float) -> tuple[float | None, float]:
        now = time.monotonic()
        meter = self.nodes.get(node)
        if meter is None:
            meter = self.nodes[node] = _NodeProgress(self.started.get(node) if node is not None else None)
        meter.update(now, value)
        its = 1.0 / meter.step_seconds if meter.step_seconds else None
        since = meter.started if meter.started is not None else (meter.first[0] if meter.first else now)
        return its, max(0.0, now - since)

    def stats(self) -> SamplingStats:
        # Count sampler nodes when the graph names them, so that a VAE decode or
        # upscaler that also reports progress does not skew it/s.
        samplers = [node for node in self.nodes if node is not None and self._is_sampler(node)]
        chosen: list[str | None] = list(samplers) or list(self.nodes)
        steps = timed_steps = seconds = 0.0
        for node in chosen:
            s, ts, sec = self.nodes[node].totals()
            steps += s
            timed_steps += ts
            seconds += sec
        its = timed_steps / seconds if seconds > 0 and timed_steps > 0 else None
        return SamplingStats(steps=int(round(steps)), seconds=seconds, its=its)

    def _is_sampler(self, node: str) -> bool:
        spec = self.graph.get(node)
        class_type = spec.get("class_type", "") if isinstance(spec, dict) else ""
        return "sampler" in str(class_type).lower()


def _is_queue_item(item: Any) -> bool:
    return isinstance(item, (list, tuple)) and len(item) >= 2


def _timestamp(data: dict[str, Any], default: float) -> float:
    """ComfyUI stamps status messages in epoch milliseconds."""
    value = data.get("timestamp")
    if isinstance(value, (int, float)) and value > 0:
        return value / 1000.0
    return default


def _number(value: Any) -> float:
    return value if isinstance(value, (int, float)) else 0


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _os_reason(exc: aiohttp.ClientConnectorError) -> str:
    os_error = getattr(exc, "os_error", None)
    return (getattr(os_error, "strerror", None) or str(os_error or exc)) if os_error else str(exc)
