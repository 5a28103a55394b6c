"""Stage 3 of a request, in a task of its own so that the runner moves on at once: the files
ComfyUI wrote are collected into the request's folder, inlined as base64 when asked for and
uploaded to S3 when configured. Outputs, uploads and webhooks never hold ComfyUI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from api.comfy import ComfyClient, ComfyError, OutputFile, PromptResult
from api.comfy.folders import Folder, OutputFolderGuide
from api.wrapper.diskfull import is_full_error, while_writing
from api.wrapper.jobs import Job
from api.wrapper.metrics import WrapperMetrics
from api.wrapper.outputs import collect, inline_base64, link_outputs, missing
from api.wrapper.retention import Retention
from api.wrapper.s3 import S3Settings, S3Uploader, UploadItem
from api.wrapper.s3 import merge as merge_s3

logger = logging.getLogger(__name__)


class OutputDelivery:
    def __init__(self, client: ComfyClient, folder: Folder, *, base64_max_bytes: int,
                 s3_defaults: S3Settings, uploader: S3Uploader | None,
                 guide: OutputFolderGuide | None = None, metrics: WrapperMetrics | None = None,
                 retention: Retention | None = None):
        self._client = client
        self.retention = retention  # guards the collection against its deletions
        self.folder = folder  # ComfyUI's output folder as this process sees it
        self._guide = guide
        self._base64_max_bytes = base64_max_bytes
        self._s3_defaults = s3_defaults
        self._uploader = uploader
        self._metrics = metrics

    async def learn_folder(self) -> None:
        """Before a prompt runs: replace a guessed output folder by the one ComfyUI uses."""
        if self._guide is not None:
            self.folder = await self._guide.learn()

    def prepare(self, job: Job) -> None:
        """While its prompt runs: make the request's folder now, so that the answer waits only
        for the links at the end (the mkdir was the dearest of the calls linking takes). Empty
        until then; the finisher removes it when nothing came. A folder that exists already, or
        cannot be made, is left to the linking, as before."""
        if job.folder_made is not None:
            return
        folder = self.folder.path / job.id
        try:
            os.mkdir(folder)
        except OSError:
            return
        job.folder_made = folder

    async def deliver(self, job: Job, result: PromptResult) -> int:
        """Fill `job.output`; the number of files whose upload failed (they stay on disk)."""
        entries = await self._collect(job, result)
        entries += [{"node_id": t.node_id, "output_type": t.output_type, "text": t.text,
                     "type": "text"} for t in result.texts]
        if job.request.return_base64:
            await asyncio.to_thread(inline_base64, entries, self._base64_max_bytes)
        await self._upload(job, entries)
        job.output = entries
        return sum(1 for e in entries if e.get("upload_error"))

    async def _collect(self, job: Job, result: PromptResult) -> list[dict[str, Any]]:
        """Link the files into the request's folder (retention deletes nothing meanwhile);
        a full disk is a DiskFull for the client, not a bug."""
        writing = self.retention.guard.writing() if self.retention else contextlib.nullcontext()
        folder = self.folder
        async with writing:
            entries = link_outputs(result.outputs, folder.path, job.id,
                                   made=job.folder_made == folder.path / job.id)
            if entries is not None:
                return entries
            # Copies, or files not where the folder says (fetched first).
            fetched = await self._fetch_missing(result.outputs)
            try:
                return await asyncio.to_thread(collect, result.outputs, folder.path, job.id,
                                               fetched, folder.why)
            except OSError as exc:
                if not is_full_error(exc):
                    raise
                raise await asyncio.to_thread(
                    while_writing, "collecting the outputs into the request's folder",
                    folder.path, exc.strerror or str(exc)) from None

    async def _fetch_missing(self, outputs: list[OutputFile]) -> dict[int, bytes | str]:
        """Files ComfyUI reported that are not in our view of its output folder (ComfyUI on
        another host or container, or a folder we got wrong): fetched through `GET /view`."""
        gone = await asyncio.to_thread(missing, outputs, self.folder.path)
        fetched: dict[int, bytes | str] = {}
        for index in gone:
            try:
                fetched[index] = await self._client.view(outputs[index])
            except ComfyError as exc:
                fetched[index] = str(exc)
        if gone:
            logger.warning("%d output file(s) not under %s (%s); fetched through ComfyUI's "
                           "GET /view: %d", len(gone), self.folder.path, self.folder.why,
                           sum(1 for v in fetched.values() if isinstance(v, bytes)))
        return fetched

    async def _upload(self, job: Job, entries: list[dict[str, Any]]) -> None:
        settings = merge_s3(self._s3_defaults, job.request.s3)
        if not settings.enabled or self._uploader is None:
            return
        files = [e for e in entries if e.get("local_path") and not e.get("error")
                 and e.get("type") != "text"]
        items = [UploadItem(Path(e["local_path"]), e["filename"], e["mimetype"]) for e in files]
        started = time.monotonic()
        outcomes = await self._uploader.upload(settings, job.id, items)
        if self._metrics and items:
            self._metrics.stage.labels("upload").observe(time.monotonic() - started)
        for entry, outcome in zip(files, outcomes):
            if outcome.url:
                entry["url"] = outcome.url
            else:
                entry["upload_error"] = outcome.error
            if self._metrics:
                self._metrics.uploads.labels("uploaded" if outcome.url else "failed").inc()
