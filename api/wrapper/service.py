"""The generation service: a bounded FIFO in front of ComfyUI, one prompt at a time.

Each request goes through three stages:

1. *prepare* (right after it is accepted, in parallel with other requests): apply the modifier,
   fetch and upload input images — so downloads never keep ComfyUI idle;
2. *generate* (the single runner, in arrival order): submit the graph, follow it to the end;
3. *finish* (a task of its own, so the runner moves on at once): collect the output files into
   the request's folder, inline base64, upload to S3, store the result, send the webhook.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from api.comfy import (
    Cached,
    ComfyClient,
    ComfyConnectionError,
    ComfyError,
    ComfyHTTPError,
    ComfyUnreachable,
    Executed,
    Executing,
    ExecutionStarted,
    Finished,
    PromptRejected,
    PromptStatus,
    PromptVanished,
)
from api.comfy import Progress as ProgressEvent
from api.contract.modifiers import ModifierRegistry, replace_random_ints
from api.contract.request import GenerateRequest, RequestInvalid
from api.contract.result import FailureKind, JobStatus, now_ms
from api.wrapper.inputs import InputError, InputFetcher, looks_like_image_reference
from api.wrapper.jobs import Job
from api.wrapper.metrics import WrapperMetrics
from api.wrapper.model_urls import (
    DEFAULT_MODEL_INPUTS,
    MODEL_URLS_OFF,
    ModelRef,
    ModelUrlResolver,
    find_model_urls,
)
from api.wrapper.outputs import collect, inline_base64, missing
from api.wrapper.s3 import S3Settings, S3Uploader, UploadItem
from api.wrapper.s3 import merge as merge_s3
from api.wrapper.store import ResultStore
from api.wrapper.webhooks import WebhookDispatcher, WebhookSettings
from api.wrapper.webhooks import merge as merge_webhook

logger = logging.getLogger(__name__)


#: Prompts handed to ComfyUI's queue ahead of the one running (ComfyUI runs them in order).
PREFETCH_DEPTH = 8
#: ComfyUI events that mean it is running the prompt, not merely holding it in its queue.
_EXECUTING_EVENTS = (ExecutionStarted, Cached, Executing, ProgressEvent, Executed)

#: Seconds a stopping wrapper waits for outputs, uploads and result files under way.
STOP_GRACE = 10.0


class QueueFull(Exception):
    pass


class DuplicateRequest(Exception):
    pass


class GenerationService:
    def __init__(self, *, client: ComfyClient, registry: ModifierRegistry, store: ResultStore,
                 fetcher: InputFetcher, uploader: S3Uploader | None,
                 webhooks: WebhookDispatcher | None, s3_defaults: S3Settings,
                 webhook_defaults: WebhookSettings, output_dir: Path, queue_size: int,
                 request_timeout: float, base64_max_bytes: int,
                 allow_private_webhooks: bool = False,
                 output_dir_why: str = "comfyui.output_dir",
                 comfy_is_ours: Callable[[], Awaitable[bool]] | None = None,
                 metrics: WrapperMetrics | None = None,
                 model_urls: ModelUrlResolver | None = None,
                 output_guide: Any = None):
        self.client = client
        # An api.comfy.folders.OutputFolderGuide: replaces a guessed output folder by ComfyUI's.
        self.output_guide = output_guide
        self.model_urls = model_urls
        self.output_dir_why = output_dir_why
        self.metrics = metrics
        self.registry = registry
        self.store = store
        self.fetcher = fetcher
        self.uploader = uploader
        self.webhooks = webhooks
        self.s3_defaults = s3_defaults
        self.webhook_defaults = webhook_defaults
        self.output_dir = output_dir
        self.queue_size = queue_size
        self.request_timeout = request_timeout
        self.base64_max_bytes = base64_max_bytes
        self.allow_private_webhooks = allow_private_webhooks
        self.active: dict[str, Job] = {}
        self.current: Job | None = None
        self.last_event_at: float | None = None  # monotonic, while a prompt runs
        self.served = collections.Counter()
        self.requeued = 0  # prompts submitted again after ComfyUI lost them before they ran
        # Whether the process on ComfyUI's port is the daemon's own (None: no daemon to ask).
        self.comfy_is_ours = comfy_is_ours
        self._comfy_suspect = False  # ComfyUI was lost: check the port's owner before submitting
        self._pending: collections.deque[Job] = collections.deque()
        # The next job's prompt, handed to ComfyUI's own queue while the current one runs, so
        # ComfyUI starts it the moment the current one ends: job id -> the submit task.
        self._prefetched: dict[str, asyncio.Future] = {}
        self._prefetcher: asyncio.Task | None = None
        self._wakeup = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        recovered = await asyncio.to_thread(self.store.load)
        if recovered:
            logger.info("result store: %d earlier results available", recovered)
        self._runner = asyncio.create_task(self._run(), name="generation-runner")

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop taking prompts; let outputs, uploads and result files that are under way
        finish (for up to `grace` seconds) so that nothing already answered is lost."""
        if self._prefetcher:
            self._prefetcher.cancel()
        if self._runner:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._background:
            done, pending = await asyncio.wait(set(self._background), timeout=grace)
            for task in pending:
                logger.warning("stopping: %s did not finish in %g s", task.get_name(), grace)
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # --- intake ---------------------------------------------------------------------------------
    def queue_depth(self) -> int:
        return len(self._pending)

    def position(self, job: Job) -> int:
        """1-based place in the queue; 0 when running or done."""
        try:
            return self._pending.index(job) + 1
        except ValueError:
            return 0

    def submit(self, request: GenerateRequest, *, record_queued: bool = True) -> Job:
        """Accept a valid request (raises RequestInvalid, DuplicateRequest or QueueFull).

        `record_queued` writes the request to the result store at once, so that a client who
        polls `/result/{id}` learns of a wrapper restart; a client still connected for the
        answer (sync, stream) learns it from the broken connection and needs no record."""
        if request.request_id in self.active:
            raise DuplicateRequest(request.request_id)
        if len(self._pending) >= self.queue_size:
            raise QueueFull()
        graph = self._build_graph(request)
        refs = self._model_refs(request, graph)
        job = Job(request)
        job.awaiting_models = bool(refs)
        job.prepared = asyncio.get_running_loop().create_future()
        self.active[job.id] = job
        self._pending.append(job)
        self._spawn(self._prepare(job, graph, refs), f"prepare-{job.id}")
        if record_queued:
            job.persisting = self._spawn(self.store.save(job.to_record()), f"persist-{job.id}")
        self._wakeup.set()
        self._announce(job)
        return job

    def _build_graph(self, request: GenerateRequest) -> dict[str, Any]:
        return build_graph(self.registry, request)

    def _model_refs(self, request: GenerateRequest, graph: dict[str, Any]) -> list[ModelRef]:
        """Model URLs in the graph; a URL that may not be fetched is a 400 now."""
        inputs = self.model_urls.inputs if self.model_urls else DEFAULT_MODEL_INPUTS
        refs = find_model_urls(graph, inputs)
        if refs:
            policy = self.model_urls.policy if self.model_urls else MODEL_URLS_OFF
            problems = policy.problems(refs)
            if problems:
                raise RequestInvalid(problems, request.request_id)
        return refs

    async def get(self, request_id: str) -> Job | dict[str, Any] | None:
        return self.active.get(request_id) or await self.store.get(request_id)

    async def cancel(self, request_id: str) -> Job | dict[str, Any] | None:
        job = self.active.get(request_id)
        if job is None:
            return await self.store.get(request_id)
        if job.status.terminal:
            return job
        job.cancel_requested = True
        if job in self._pending:
            self._pending.remove(job)
            submitted = self._prefetched.pop(job.id, None)
            if submitted is not None:
                await asyncio.gather(submitted, return_exceptions=True)
                if job.prompt_id:
                    await self._stop_prompt(job)
            await self._finish(job, JobStatus.CANCELLED, "Cancelled while queued.")
        elif job is self.current and job.prompt_id:
            await self._stop_prompt(job)
        # Without a prompt id yet, the runner stops it as soon as ComfyUI has queued it.
        return job

    async def _stop_prompt(self, job: Job) -> None:
        """Stop the job's prompt wherever it is in ComfyUI: still queued there, or running."""
        try:
            await self.client.cancel(job.prompt_id)
        except ComfyError as exc:
            logger.warning("stopping the prompt of %s failed: %s", job.id, exc)

    # --- stage 1: inputs ------------------------------------------------------------------------
    async def _prepare(self, job: Job, graph: dict[str, Any], refs: list[ModelRef]) -> None:
        started = time.monotonic()
        try:
            if refs:
                await self._fetch_models(job, graph, refs)
            graph = await self._upload_inputs(job, graph)
        except InputError as exc:
            job.prepared.set_exception(exc)
        except ComfyConnectionError as exc:
            job.prepared.set_exception(exc)
        except Exception as exc:  # a bug: report it as such, keep serving
            logger.exception("preparing %s failed", job.id)
            job.prepared.set_exception(exc)
        else:
            job.prepared.set_result(graph)
            if self.current is not None:  # something runs: queue this one behind it in ComfyUI
                self._prefetch_next()
        job.preprocess_ms = int((time.monotonic() - started) * 1000) - job.model_download_ms

    async def _fetch_models(self, job: Job, graph: dict[str, Any], refs: list[ModelRef]) -> None:
        """Download (or find cached) the job's model URLs; the runner serves others meanwhile."""
        assert self.model_urls is not None
        started = time.monotonic()
        try:
            leases = await self.model_urls.resolve(graph, refs)
            if job.status.terminal:  # cancelled while it waited: nothing holds the files now
                self.model_urls.release(leases)
            else:
                job.model_leases = leases
        finally:
            job.model_download_ms = int((time.monotonic() - started) * 1000)
            job.awaiting_models = False
            self._wakeup.set()
            if self.current is not None:
                self._prefetch_next()

    async def _upload_inputs(self, job: Job, graph: dict[str, Any]) -> dict[str, Any]:
        count = 0
        for node_id, node in graph.items():
            inputs = node.get("inputs") or {}
            for name, value in list(inputs.items()):
                if not looks_like_image_reference(value) and not (
                        name == "image" and isinstance(value, str) and len(value) > 256):
                    continue
                try:
                    image = await self.fetcher.load(value)
                except InputError as exc:
                    raise InputError(f"node {node_id} input '{name}': {exc}") from None
                count += 1
                uploaded = await self.client.upload_image(
                    image.data, f"{job.id}_{count}.{image.extension}", overwrite=True)
                inputs[name] = (f"{uploaded.subfolder}/{uploaded.name}" if uploaded.subfolder
                                else uploaded.name)
        return graph

    # --- stage 2: ComfyUI -----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            job = self._next_job()
            while job is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                job = self._next_job()
            self._pending.remove(job)
            for waiting in self._pending:
                self._announce(waiting)
            self.current = job
            try:
                await self._generate(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("request %s: unexpected error", job.id)
                await self._finish(job, JobStatus.FAILED, "Internal error in the wrapper.",
                                   FailureKind.INTERNAL)
            finally:
                self.current = None
                self.last_event_at = None

    async def _generate(self, job: Job) -> None:
        job.status = JobStatus.PROCESSING
        job.message = "Preparing inputs."
        self._announce(job)
        try:
            graph = await job.prepared
        except InputError as exc:
            await self._finish(job, JobStatus.FAILED, f"Input rejected: {exc}", FailureKind.INVALID,
                               {"errors": {"input": str(exc)}})
            return
        except ComfyConnectionError as exc:
            await self._finish(job, JobStatus.FAILED, f"ComfyUI unreachable: {exc}",
                               FailureKind.COMFYUI_LOST)
            return
        if job.cancel_requested:
            await self._finish(job, JobStatus.CANCELLED, "Cancelled before it started.")
            return

        if self.output_guide is not None:
            folder = await self.output_guide.learn()
            self.output_dir, self.output_dir_why = folder.path, folder.why
        job.status = JobStatus.GENERATING
        job.message = "Generating."
        job.started_at_ms = now_ms()
        self.last_event_at = time.monotonic()
        self._announce(job)

        executing = [False]  # ComfyUI began running this prompt (not merely queued it)

        def on_event(event: Any) -> None:
            self.last_event_at = time.monotonic()
            if isinstance(event, _EXECUTING_EVENTS):
                executing[0] = True
            if isinstance(event, ProgressEvent):
                job.last_progress = {"step": int(event.value), "max": int(event.max),
                                     "its": round(event.its_per_second, 3)
                                     if event.its_per_second else None, "node": event.node}
                job.publish({"event": "progress", **self._status_event(job),
                             "progress": job.last_progress})
            elif not isinstance(event, Finished) and getattr(event, "prompt_id", None):
                first = job.prompt_id is None
                job.prompt_id = event.prompt_id
                if first and job.cancel_requested:  # cancelled while it was being submitted
                    self._spawn(self._stop_prompt(job), f"stop-{job.id}")
                if first:  # ComfyUI has it: the next one may queue behind it now
                    self._prefetch_next()

        deadline = time.monotonic() + self.request_timeout
        submitted = self._prefetched.pop(job.id, None)
        try:
            while True:
                if self._comfy_suspect and submitted is None:
                    await self._until_comfyui_is_ours(deadline)
                if submitted is not None:
                    run = asyncio.create_task(self._wait_prefetched(submitted, graph, on_event))
                else:
                    run = asyncio.create_task(self.client.run_prompt(graph, on_event=on_event))
                submitted = None
                try:
                    result = await asyncio.wait_for(asyncio.shield(run),
                                                    max(0.0, deadline - time.monotonic()))
                    break
                except (ComfyConnectionError, PromptVanished) as exc:
                    self._comfy_suspect = self.comfy_is_ours is not None
                    # ComfyUI went away (or came back empty) before this prompt ever ran: not
                    # this request's fault, so it goes again, in its turn, on the new ComfyUI.
                    # Only a prompt that was running fails.
                    if executing[0] or job.cancel_requested or \
                            not await self._requeue_after_restart(job, exc, deadline):
                        raise
        except asyncio.TimeoutError:
            await self._interrupt_and_wait(job, run)
            await self._finish(job, JobStatus.TIMEOUT,
                               f"Timed out after {self.request_timeout:g} s; the prompt was "
                               "interrupted.")
            return
        except PromptRejected as exc:
            await self._finish(job, JobStatus.FAILED,
                               f"ComfyUI rejected the workflow: {exc.error.get('message', '')}",
                               FailureKind.INVALID,
                               {"error": exc.error, "node_errors": exc.node_errors})
            return
        except PromptVanished as exc:
            if job.cancel_requested:  # we removed it from ComfyUI's queue ourselves
                await self._finish(job, JobStatus.CANCELLED, "Cancelled before it started.")
            else:
                await self._finish(job, JobStatus.FAILED, f"ComfyUI lost the prompt: {exc}",
                                   FailureKind.COMFYUI_LOST)
            return
        except ComfyHTTPError as exc:  # ComfyUI (or what answers on its port) misbehaved
            await self._finish(job, JobStatus.FAILED, f"ComfyUI answered badly: {exc}",
                               FailureKind.COMFYUI_LOST)
            return
        except ComfyConnectionError as exc:
            what = "unreachable" if isinstance(exc, ComfyUnreachable) else "lost"
            await self._finish(job, JobStatus.FAILED, f"ComfyUI {what}: {exc}",
                               FailureKind.COMFYUI_LOST)
            return
        except asyncio.CancelledError:
            run.cancel()
            raise

        job.prompt_id = result.prompt_id
        job.generated_at_ms = now_ms()
        job.steps = result.sampling.steps
        job.sampling_its = result.sampling.its
        job.comfyui_response = {result.prompt_id: result.history} if result.history else {}
        if result.status is PromptStatus.INTERRUPTED:
            status = JobStatus.CANCELLED if job.cancel_requested else JobStatus.FAILED
            message = "Cancelled while running." if job.cancel_requested else \
                "Interrupted in ComfyUI by someone else."
            await self._finish(job, status, message,
                               None if job.cancel_requested else FailureKind.EXECUTION)
            return
        if result.status is PromptStatus.FAILED:
            err = result.error
            detail = {"error": {"type": "execution_error", "node_id": err.node_id,
                                "node_type": err.node_type,
                                "exception_type": err.exception_type,
                                "exception_message": err.exception_message}} if err else {}
            where = f"node {err.node_id} ({err.node_type})" if err else "a node"
            text = f"{err.exception_type}: {err.exception_message}" if err else "unknown error"
            await self._finish(job, JobStatus.FAILED, f"ComfyUI failed in {where}: {text}",
                               FailureKind.EXECUTION, detail)
            return
        job.status = JobStatus.GENERATED
        job.message = "Generated; collecting outputs."
        self._announce(job)
        # The runner moves on now: outputs, uploads and webhooks never hold ComfyUI.
        self._spawn(self._postprocess(job, result), f"postprocess-{job.id}")

    async def _requeue_after_restart(self, job: Job, exc: Exception, deadline: float) -> bool:
        """Wait for a ComfyUI that answers again, to submit `job` anew; False when time is up.

        The prompts handed ahead to the old ComfyUI's queue died with it: forget them, so each
        goes again in its turn (the next in line is handed ahead again once this one runs)."""
        logger.warning("request %s: ComfyUI lost its prompt before it ran (%s); submitting it "
                       "again on the restarted ComfyUI", job.id, exc)
        self._forget_prefetched()
        job.prompt_id = None
        delay = 0.2
        while time.monotonic() + delay < deadline:
            await asyncio.sleep(delay)
            if job.cancel_requested:
                return False
            try:
                await self.client.queue(timeout=2.0)
            except ComfyError:
                delay = min(delay * 2, 2.0)
                continue
            self.requeued += 1
            return True
        return False

    def comfy_lost(self) -> None:
        """Told from outside (the daemon's signal) that ComfyUI died: check before submitting."""
        if self.comfy_is_ours is not None:
            self._comfy_suspect = True
            logger.info("ComfyUI was lost: nothing is submitted until its port is ComfyUI's again")

    async def _until_comfyui_is_ours(self, deadline: float) -> None:
        """After ComfyUI was lost, submit nothing until the process on its port is the one the
        daemon started (a stranger may have taken the port meanwhile; the daemon will not call
        it ready, and neither do we). Gives up at `deadline`; the submission then fails."""
        assert self.comfy_is_ours is not None
        while time.monotonic() < deadline:
            if await self.comfy_is_ours():
                self._comfy_suspect = False
                return
            await asyncio.sleep(0.25)

    def _forget_prefetched(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.cancel()
            self._prefetcher = None
        for waiting in self._pending:
            if self._prefetched.pop(waiting.id, None) is not None:
                waiting.prompt_id = None

    def _prefetch_next(self) -> None:
        """Hand the waiting jobs' prompts to ComfyUI's own queue, in order, while one runs.

        ComfyUI then starts each the moment the previous one ends. Only once the current prompt
        is in ComfyUI's queue (it has a prompt id), and one submission at a time, so that no
        prompt overtakes another; a job whose inputs are not ready yet stops the walk."""
        current = self.current
        if current is None or current.prompt_id is None:
            return
        if self._prefetcher is None or self._prefetcher.done():
            self._prefetcher = asyncio.create_task(self._prefetch_waiting(), name="prefetch")

    def _next_job(self) -> Job | None:
        """The job to run next: ComfyUI's own queue order first (the prompts handed to it ahead,
        in the order they were handed), else the first waiting job that is not waiting for a
        model download — a download never holds ComfyUI while others could run."""
        for job_id in self._prefetched:
            job = self.active.get(job_id)
            if job is not None and job in self._pending:
                return job
        for job in self._pending:
            if not job.awaiting_models:
                return job
        return None

    async def _prefetch_waiting(self) -> None:
        index = 0
        while index < len(self._pending) and index < PREFETCH_DEPTH:
            job = self._pending[index]
            index += 1
            if job.id in self._prefetched or job.cancel_requested or job.awaiting_models:
                continue
            ready = job.prepared is not None and job.prepared.done() and \
                job.prepared.exception() is None
            if not ready:
                return
            future: asyncio.Future = asyncio.get_running_loop().create_future()
            self._prefetched[job.id] = future
            try:
                submission = await self.client.submit(job.prepared.result(),
                                                      client_id=uuid.uuid4().hex)
            except Exception as exc:  # the runner reports it when the job's turn comes
                future.set_exception(exc)
                future.exception()  # retrieved here; the runner raises it again
                return
            job.prompt_id = submission.prompt_id
            future.set_result(submission)
            if job.cancel_requested:  # cancelled while its prompt was on the way
                await self._stop_prompt(job)

    async def _wait_prefetched(self, submitted: asyncio.Future, graph: dict[str, Any],
                               on_event: Any) -> Any:
        submission = await submitted  # raises what submitting raised (e.g. PromptRejected)
        self._prefetch_next()
        return await self.client.wait(submission.prompt_id, client_id=submission.client_id,
                                      graph=graph, on_event=on_event)

    async def _interrupt_and_wait(self, job: Job, run: asyncio.Task) -> None:
        try:
            if job.prompt_id:
                await self.client.interrupt(job.prompt_id)
            await asyncio.wait_for(asyncio.shield(run), 30)
        except (asyncio.TimeoutError, ComfyError, asyncio.CancelledError):
            run.cancel()
        except Exception:  # the prompt's own outcome no longer matters
            pass

    # --- stage 3: outputs -----------------------------------------------------------------------
    async def _postprocess(self, job: Job, result: Any) -> None:
        try:
            fetched = await self._fetch_missing(result.outputs)
            entries = await asyncio.to_thread(collect, result.outputs, self.output_dir, job.id,
                                              fetched, self.output_dir_why)
            entries += [{"node_id": t.node_id, "output_type": t.output_type, "text": t.text,
                         "type": "text"} for t in result.texts]
            if job.request.return_base64:
                await asyncio.to_thread(inline_base64, entries, self.base64_max_bytes)
            await self._upload(job, entries)
            job.output = entries
            failed = sum(1 for e in entries if e.get("upload_error"))
            message = "Processing complete." if not failed else \
                f"Processing complete; {failed} upload(s) failed, the files are kept on disk."
            await self._finish(job, JobStatus.COMPLETED, message)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("request %s: collecting outputs failed", job.id)
            await self._finish(job, JobStatus.FAILED, "Internal error while collecting outputs.",
                               FailureKind.INTERNAL)

    async def _fetch_missing(self, outputs: list[Any]) -> dict[int, bytes | str]:
        """Files ComfyUI reported that are not in our view of its output folder (ComfyUI on
        another host or container, or a folder we got wrong): fetched through `GET /view`."""
        gone = await asyncio.to_thread(missing, outputs, self.output_dir)
        fetched: dict[int, bytes | str] = {}
        for index in gone:
            try:
                fetched[index] = await self.client.view(outputs[index])
            except ComfyError as exc:
                fetched[index] = str(exc)
        if gone:
            logger.warning("%d output file(s) not under %s (%s); fetched through ComfyUI's "
                           "GET /view: %d", len(gone), self.output_dir, self.output_dir_why,
                           sum(1 for v in fetched.values() if isinstance(v, bytes)))
        return fetched

    async def _upload(self, job: Job, entries: list[dict[str, Any]]) -> None:
        settings = merge_s3(self.s3_defaults, job.request.s3)
        if not settings.enabled or self.uploader is None:
            return
        files = [e for e in entries if e.get("local_path") and not e.get("error")
                 and e.get("type") != "text"]
        items = [UploadItem(Path(e["local_path"]), e["filename"], e["mimetype"]) for e in files]
        started = time.monotonic()
        outcomes = await self.uploader.upload(settings, job.id, items)
        if self.metrics and items:
            self.metrics.stage.labels("upload").observe(time.monotonic() - started)
        for entry, outcome in zip(files, outcomes):
            if outcome.url:
                entry["url"] = outcome.url
            else:
                entry["upload_error"] = outcome.error
            if self.metrics:
                self.metrics.uploads.labels("uploaded" if outcome.url else "failed").inc()

    # --- the end of every request ---------------------------------------------------------------
    async def _finish(self, job: Job, status: JobStatus, message: str,
                      failure: FailureKind | None = None,
                      detail: dict[str, Any] | None = None) -> None:
        job.status = status
        job.message = message
        job.failure = failure if status is JobStatus.FAILED else None
        job.detail = detail or {}
        job.completed_at_ms = now_ms()
        if job.model_leases and self.model_urls:  # the cache may evict its models from now on
            self.model_urls.release(job.model_leases)
            job.model_leases = []
        if job.generated_at_ms is None and job.started_at_ms:
            job.generated_at_ms = job.completed_at_ms
        self.served[status.value] += 1
        if self.metrics:
            outcome = job.failure.value if job.failure else status.value
            self.metrics.job_finished(outcome, job.timings(), job.started_at_ms is not None)
        level = logging.INFO if status is JobStatus.COMPLETED else logging.WARNING
        logger.log(level, "request %s %s: %s", job.id, status.value, message)
        record = job.to_record()
        self.store.remember(record)  # readable at /result/{id} from now on
        self.active.pop(job.id, None)
        job.publish({"event": "final_result", "request_id": job.id, "status": "final_result",
                     "result": job.result(), "elapsed_time": _elapsed(job)})
        job.done.set()  # the waiting client is answered without waiting for the disk
        self._spawn(self._persist_final(job, record), f"persist-final-{job.id}")
        self._send_webhook(job)

    async def _persist_final(self, job: Job, record: dict[str, Any]) -> None:
        if job.persisting is not None:  # the "queued" record must not land after this one
            await asyncio.gather(job.persisting, return_exceptions=True)
        await self.store.write(record)

    def _send_webhook(self, job: Job) -> None:
        if self.webhooks is None:
            return
        settings = merge_webhook(self.webhook_defaults, job.request.webhook)
        if not settings.enabled:
            return
        payload = {"id": job.id, "status": job.status.value, "message": job.message,
                   "output": job.output, "timings": job.timings(),
                   "extra": settings.extra_params or {}}
        self.webhooks.submit(settings, payload, job.id)

    # --- helpers --------------------------------------------------------------------------------
    def _status_event(self, job: Job) -> dict[str, Any]:
        return {"request_id": job.id, "status": job.status.value, "message": job.message,
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "elapsed_time": _elapsed(job),
                "queue_position": {"position": self.position(job),
                                   "queue_size": len(self._pending)}}

    def _announce(self, job: Job) -> None:
        if job.listeners:
            event = "queued" if job.status is JobStatus.PENDING else "status"
            job.publish({"event": event, **self._status_event(job)})

    def _spawn(self, coro: Any, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def health_detail(self) -> dict[str, Any]:
        job = self.current
        return {
            "queue_depth": len(self._pending),
            "running": job.id if job else None,
            "prompt_id": job.prompt_id if job else None,
            "seconds_since_progress": round(time.monotonic() - self.last_event_at, 3)
            if job and self.last_event_at else None,
            "served": dict(self.served),
            "webhooks": {"pending": self.webhooks.pending if self.webhooks else 0,
                         "spool_bytes": self.webhooks.spool_bytes if self.webhooks else 0,
                         "spool_dropped": self.webhooks.dropped if self.webhooks else 0},
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


def _elapsed(job: Job) -> float:
    return round((now_ms() - job.queued_at_ms) / 1000, 3)

