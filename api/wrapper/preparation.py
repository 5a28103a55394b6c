"""Stage 1 of a request, right after it is accepted and in parallel with other requests: its
model URLs downloaded (or found cached) and its input images fetched and uploaded to ComfyUI, so
that downloads never keep ComfyUI idle. The outcome is the job's `prepared` future: the graph to
run, or the error that ends the request when its turn comes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api.comfy import ComfyClient, ComfyConnectionError, ComfyHTTPError
from api.wrapper.diskfull import DiskFull, upload_refused
from api.wrapper.inputs import InputError, InputFetcher, InputImage, looks_like_image_reference
from api.wrapper.jobs import Job
from api.wrapper.model_urls import ModelRef, ModelUrlResolver
from api.wrapper.retention import Retention

logger = logging.getLogger(__name__)


class InputPreparer:
    def __init__(self, client: ComfyClient, fetcher: InputFetcher,
                 model_urls: ModelUrlResolver | None = None, *,
                 retention: Retention | None = None, input_folder: Path | None = None):
        self._client = client
        self._fetcher = fetcher
        self._model_urls = model_urls
        self._retention = retention
        self._input_folder = input_folder  # ComfyUI's, as this process sees it (None: unknown)

    @staticmethod
    def needed(graph: dict[str, Any], refs: list[ModelRef]) -> bool:
        """Whether the graph has anything to fetch or upload (else it runs as it is)."""
        return bool(refs) or any(_is_image_input(name, value) for node in graph.values()
                                 for name, value in (node.get("inputs") or {}).items())

    async def prepare(self, job: Job, graph: dict[str, Any], refs: list[ModelRef],
                      ready: Callable[[], None]) -> None:
        """Fill `job.prepared`; `ready` is told when the job's models or inputs are in (it may
        run, or be handed ahead to ComfyUI, now)."""
        assert job.prepared is not None
        started = time.monotonic()
        try:
            if refs:
                await self._fetch_models(job, graph, refs, ready)
            graph = await self._upload_inputs(job, graph)
        except (InputError, ComfyConnectionError, ComfyHTTPError, DiskFull) as exc:
            job.prepared.set_exception(exc)
        except Exception as exc:  # a bug: report it as such, keep serving
            logger.exception("preparing %s failed", job.id)
            job.prepared.set_exception(exc)
        else:
            job.prepared.set_result(graph)
            ready()
        job.preprocess_ms = int((time.monotonic() - started) * 1000) - job.model_download_ms

    async def _fetch_models(self, job: Job, graph: dict[str, Any], refs: list[ModelRef],
                            ready: Callable[[], None]) -> None:
        """Download (or find cached) the job's model URLs; the runner serves others meanwhile."""
        assert self._model_urls is not None
        started = time.monotonic()
        try:
            leases = await self._model_urls.resolve(graph, refs)
            if job.status.terminal:  # cancelled while it waited: nothing holds the files now
                self._model_urls.release(leases)
            else:
                job.model_leases = leases
        finally:
            job.model_download_ms = int((time.monotonic() - started) * 1000)
            job.awaiting_models = False
            ready()

    async def _upload_inputs(self, job: Job, graph: dict[str, Any]) -> dict[str, Any]:
        count = 0
        for node_id, node in graph.items():
            inputs = node.get("inputs") or {}
            for name, value in list(inputs.items()):
                if not _is_image_input(name, value):
                    continue
                try:
                    image = await self._fetcher.load(value)
                except InputError as exc:
                    raise InputError(f"node {node_id} input '{name}': {exc}") from None
                count += 1
                stored = await self._upload(job, image, f"{job.id}_{count}.{image.extension}",
                                            f"node {node_id} input '{name}'")
                inputs[name] = stored
        return graph

    async def _upload(self, job: Job, image: InputImage, filename: str, what: str) -> str:
        """Upload one image into ComfyUI's input folder (retention deletes nothing meanwhile,
        and is told of the file); the name the graph refers to it by."""
        writing = self._retention.guard.writing() if self._retention else contextlib.nullcontext()
        async with writing:
            try:
                uploaded = await self._client.upload_image(image.data, filename, overwrite=True)
            except ComfyHTTPError as exc:
                if self._input_folder is not None:
                    full = await asyncio.to_thread(upload_refused, f"the image of {what}",
                                                   self._input_folder, len(image.data),
                                                   exc.status)
                    if full is not None:
                        raise full from None
                raise
            stored = f"{uploaded.subfolder}/{uploaded.name}" if uploaded.subfolder \
                else uploaded.name
            if self._retention is not None and self._input_folder is not None:
                self._retention.input_uploaded(job.id, self._input_folder / stored)
        return stored


def _is_image_input(name: str, value: Any) -> bool:
    """An input image to fetch or decode: a URL, a data URI, or long text in an `image` input
    (plain base64)."""
    return looks_like_image_reference(value) or (
        name == "image" and isinstance(value, str) and len(value) > 256)
