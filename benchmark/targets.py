"""Where a benchmark run is sent, and how one run is carried out there.

``WrapperTarget`` posts to the API wrapper's ``/generate/stream``, the path real requests take,
so the benchmark also proves the wrapper works. ``ComfyTarget`` talks to ComfyUI directly
(when no wrapper runs, or to tell the two apart). Either way the checkpoint and
``/system_stats`` are read from ComfyUI itself (``comfy_url``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Union

import aiohttp

from api.comfy import (
    ComfyClient,
    ComfyConnectionError,
    ComfyError,
    OutputFile,
    Progress,
    PromptRejected,
    PromptStatus,
)
from benchmark.errors import OutputInvalid, RunFailed
from benchmark.graph import SAVE_NODE

logger = logging.getLogger(__name__)

# (step, max_steps, smoothed it/s or None)
StepCallback = Callable[[int, int, Optional[float]], Optional[Awaitable[Any]]]


@dataclass(frozen=True)
class ComfyTarget:
    """ComfyUI at ``url``; ``output_dir`` is its output folder as this process sees it (None:
    images are fetched through ComfyUI's ``GET /view``)."""

    url: str
    output_dir: Path | None = None

    @property
    def comfy_url(self) -> str:
        return self.url

    def describe(self) -> str:
        return f"comfyui {self.url}"


@dataclass(frozen=True)
class WrapperTarget:
    """The API wrapper at ``url``, in front of ComfyUI at ``comfy_url``.

    ``output_dir`` (ComfyUI's output folder, optional) lets the benchmark delete ComfyUI's own
    copy of each image too, not only the wrapper's.
    """

    url: str
    comfy_url: str
    output_dir: Path | None = None

    def describe(self) -> str:
        return f"wrapper {self.url}"


Target = Union[ComfyTarget, WrapperTarget]


@dataclass(frozen=True)
class RunOutcome:
    """What one run produced, before its image is checked."""

    seconds: float  # see BenchmarkReport.seconds
    wall_seconds: float
    its: float | None
    steps: int
    output_path: str | None
    other_files: tuple[Path, ...] = ()  # more copies of the same image, removed with it
    #: ComfyUI's own file, for GET /view when ``output_path`` is not on this machine's disk.
    comfy_file: OutputFile | None = None


class _StepMeter:
    """Sampler it/s from progress events: steps over the time from the first to the last one
    (the first step also absorbs start-up work, so it is left out)."""

    def __init__(self) -> None:
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] | None = None

    def update(self, step: int) -> None:
        now = time.monotonic()
        if self.last is not None and step < self.last[1]:
            self.first = None  # a second sampler (or a restart) begins; measure the latest
        if self.first is None:
            self.first = (now, step)
        self.last = (now, step)

    @property
    def steps(self) -> int:
        return self.last[1] if self.last else 0

    @property
    def its(self) -> float | None:
        if self.first is None or self.last is None:
            return None
        steps = self.last[1] - self.first[1]
        seconds = self.last[0] - self.first[0]
        return steps / seconds if steps > 0 and seconds > 0 else None


async def call_callback(callback: Callable[..., Any] | None, *args: Any) -> None:
    if callback is None:
        return
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:  # a display callback must never fail a benchmark run
        logger.exception("benchmark progress callback failed")


class ComfyDriver:
    """Runs benchmark graphs on ComfyUI through ``client``."""

    def __init__(self, target: ComfyTarget, client: ComfyClient) -> None:
        self.target = target
        self.client = client

    async def run(self, graph: dict[str, Any], run_id: str, timeout: float,
                  on_step: StepCallback | None = None) -> RunOutcome:
        prompt_id = str(uuid.uuid4())

        async def on_event(event: Any) -> None:
            if isinstance(event, Progress):
                await call_callback(on_step, int(event.value), int(event.max), event.its_per_second)

        started = time.monotonic()
        try:
            result = await asyncio.wait_for(
                self.client.run_prompt(graph, prompt_id=prompt_id, on_event=on_event), timeout)
        except asyncio.TimeoutError:
            await self._abort(prompt_id)
            raise RunFailed(f"the run took longer than {timeout:g} s "
                            "(benchmark.run_timeout); it was interrupted") from None
        except PromptRejected as exc:
            raise RunFailed(f"ComfyUI rejected the benchmark graph: {exc}"
                            + _node_errors_text(exc.node_errors)) from None
        except ComfyConnectionError as exc:
            raise RunFailed(f"ComfyUI at {self.target.url} could not be reached: {exc.reason}") from None
        except ComfyError as exc:
            raise RunFailed(f"ComfyUI error: {exc}") from None
        wall = time.monotonic() - started
        if result.status is PromptStatus.FAILED:
            err = result.error
            where = f"node {err.node_id} ({err.node_type})" if err else "a node"
            text = f"{err.exception_type}: {err.exception_message}" if err else "unknown error"
            raise RunFailed(f"ComfyUI failed in {where}: {text}")
        if result.status is PromptStatus.INTERRUPTED:
            raise RunFailed("the run was interrupted in ComfyUI (by someone else)")
        images = [o for o in result.outputs if o.node_id == SAVE_NODE] or list(result.outputs)
        if not images:
            raise OutputInvalid("the run completed but ComfyUI reported no output image")
        return RunOutcome(seconds=wall, wall_seconds=wall, its=result.sampling.its,
                          steps=result.sampling.steps,
                          output_path=str(images[0].local_path) if images[0].local_path else None,
                          comfy_file=images[0])

    async def _abort(self, prompt_id: str) -> None:
        try:
            await self.client.cancel(prompt_id)
        except ComfyError as exc:
            logger.warning("benchmark: could not interrupt prompt %s: %s", prompt_id, exc)


class WrapperDriver:
    """Runs benchmark graphs through the wrapper's ``POST /generate/stream``."""

    def __init__(self, target: WrapperTarget, session: aiohttp.ClientSession) -> None:
        self.target = target
        self.session = session

    async def run(self, graph: dict[str, Any], run_id: str, timeout: float,
                  on_step: StepCallback | None = None) -> RunOutcome:
        started = time.monotonic()
        try:
            final = await asyncio.wait_for(self._stream(graph, run_id, on_step), timeout)
        except asyncio.TimeoutError:
            # Leaving the stream already makes the wrapper cancel it; say so explicitly too.
            await self._abort(run_id)
            raise RunFailed(f"the run took longer than {timeout:g} s "
                            "(benchmark.run_timeout); it was cancelled") from None
        except aiohttp.ClientError as exc:
            raise RunFailed(f"the wrapper at {self.target.url} could not be reached: {exc}") from None
        wall = time.monotonic() - started
        result, meter = final
        status = result.get("status")
        if status != "completed":
            message = result.get("message") or "no message"
            raise RunFailed(f"the wrapper reported the run {status or 'unfinished'}: {message}")
        timings = result.get("timings") or {}
        generation_ms = timings.get("generation_ms") or 0
        seconds = generation_ms / 1000.0 if generation_ms > 0 else wall
        images = [o for o in result.get("output") or []
                  if isinstance(o, dict) and o.get("type") != "text"]
        if not images:
            raise OutputInvalid("the run completed but the wrapper returned no output image")
        first = next((o for o in images if str(o.get("node_id")) == SAVE_NODE), images[0])
        if first.get("error"):
            raise OutputInvalid(f"the wrapper reported the image as broken: {first['error']}")
        its = meter.its or timings.get("sampling_its")
        steps = meter.steps or int(timings.get("steps") or 0)
        return RunOutcome(seconds=seconds, wall_seconds=wall, its=its, steps=steps,
                          output_path=first.get("local_path"),
                          other_files=self._comfy_copies(result),
                          comfy_file=_comfy_image(result))

    def _comfy_copies(self, result: dict[str, Any]) -> tuple[Path, ...]:
        """ComfyUI's own files of this run (the wrapper hands out links or copies of them)."""
        if self.target.output_dir is None:
            return ()
        root = os.path.normpath(os.path.abspath(self.target.output_dir))
        found = []
        for entry in (result.get("comfyui_response") or {}).values():
            for node_output in ((entry or {}).get("outputs") or {}).values():
                for item in (node_output or {}).get("images") or []:
                    if not isinstance(item, dict) or item.get("type", "output") != "output":
                        continue
                    name = str(item.get("filename") or "")
                    path = os.path.normpath(os.path.join(root, str(item.get("subfolder") or ""), name))
                    if path != root and os.path.commonpath([root, path]) == root:  # never outside it
                        found.append(Path(path))
        return tuple(found)

    async def _stream(self, graph: dict[str, Any], run_id: str, on_step: StepCallback | None
                      ) -> tuple[dict[str, Any], _StepMeter]:
        """Follow the run on ``/generate/stream``; a wrapper without it is asked on
        ``/generate/sync``, the one route the contract promises.

        Two dialects of server-sent events are understood: named events (``event: progress``,
        ``event: final_result``, this project's wrapper) and plain ``data:`` events whose JSON
        ``status`` says what they are (the ai-dock wrapper: ``final_result`` carries the result,
        ``error`` a failure). Step progress is only shown where the wrapper sends it."""
        body = {"input": {"workflow_json": graph, "request_id": run_id}}
        meter = _StepMeter()
        base = self.target.url.rstrip("/")
        # ComfyUI's own response names its copy of the image: to clean it up, or to fetch it
        # through GET /view when the wrapper's path is not on this machine's disk.
        headers = {"X-Include-ComfyUI-Response": "1"}
        async with self.session.post(base + "/generate/stream", json=body,
                                     headers=headers) as response:
            if response.status in (404, 405):
                return await self._sync(base, body, headers), meter
            if response.status != 200:
                text = await response.text()
                raise RunFailed(f"the wrapper answered HTTP {response.status}: {_short_error(text)}")
            async for event, data in _iter_sse(response):
                kind = event if event != "message" else str(data.get("status") or "")
                if kind == "progress":
                    progress = data.get("progress") or {}
                    step, total = int(progress.get("step") or 0), int(progress.get("max") or 0)
                    meter.update(step)
                    await call_callback(on_step, step, total, progress.get("its"))
                elif kind == "final_result":
                    result = data.get("result")
                    if not isinstance(result, dict):
                        raise RunFailed("the wrapper's final_result event carries no result")
                    return result, meter
                elif kind == "error" and event == "message":
                    raise RunFailed(f"the wrapper's event stream failed: "
                                    f"{data.get('message') or 'no message'}")
        raise RunFailed("the wrapper closed the event stream before the final result")

    async def _sync(self, base: str, body: dict[str, Any], headers: dict[str, str]
                    ) -> dict[str, Any]:
        async with self.session.post(base + "/generate/sync", json=body,
                                     headers=headers) as response:
            text = await response.text()
            try:
                result = json.loads(text)
            except ValueError:
                result = None
            if not isinstance(result, dict) or "status" not in result:
                raise RunFailed(f"the wrapper answered HTTP {response.status}: {_short_error(text)}")
            return result

    async def _abort(self, run_id: str) -> None:
        url = self.target.url.rstrip("/") + f"/cancel/{run_id}"
        try:
            async with self.session.post(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
                await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            logger.warning("benchmark: could not cancel %s at the wrapper: %s", run_id, exc)


async def _iter_sse(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event, data as JSON) for each server-sent event; comments and bad JSON are skipped."""
    event = "message"
    data_lines: list[str] = []
    async for raw in response.content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line == "":
            if data_lines:
                try:
                    data = json.loads("\n".join(data_lines))
                except ValueError:
                    logger.warning("benchmark: event %s with data that is not JSON", event)
                else:
                    if isinstance(data, dict):
                        yield event, data
            event, data_lines = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data_lines.append(line[len("data:"):].lstrip(" "))


def _comfy_image(result: dict[str, Any]) -> OutputFile | None:
    """ComfyUI's own record of the benchmark image, from the history entry the wrapper passed on."""
    for prompt_id, entry in (result.get("comfyui_response") or {}).items():
        outputs = (entry or {}).get("outputs") if isinstance(entry, dict) else None
        if not isinstance(outputs, dict):
            continue
        ordered = sorted(outputs.items(), key=lambda kv: str(kv[0]) != SAVE_NODE)
        for node_id, node_output in ordered:
            for item in (node_output or {}).get("images") or []:
                if isinstance(item, dict) and item.get("filename") and \
                        item.get("type", "output") == "output":
                    return OutputFile(node_id=str(node_id), output_type="images",
                                      filename=str(item["filename"]),
                                      subfolder=str(item.get("subfolder") or ""), type="output",
                                      local_path=None, mimetype="image/png")
    return None


def _short_error(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text[:300]
    if isinstance(body, dict):
        detail = body.get("error") or body.get("message") or body.get("errors") or body
        return json.dumps(detail)[:300] if not isinstance(detail, str) else detail[:300]
    return text[:300]


def _node_errors_text(node_errors: dict[str, Any]) -> str:
    parts = []
    for node_id, info in node_errors.items():
        for err in (info or {}).get("errors") or []:
            parts.append(f"node {node_id} ({(info or {}).get('class_type', '?')}): "
                         f"{err.get('message', '')} {err.get('details', '')}".strip())
    return (" [" + "; ".join(parts[:3]) + "]") if parts else ""
