"""One request's life in the wrapper: its status, its result, and who is waiting for it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.contract.request import GenerateRequest
from api.contract.result import HTTP_FOR_FAILURE, FailureKind, JobStatus, now_ms


@dataclass
class Job:
    request: GenerateRequest
    status: JobStatus = JobStatus.PENDING
    message: str = "Queued."
    failure: FailureKind | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # e.g. ComfyUI's error + node_errors
    output: list[dict[str, Any]] = field(default_factory=list)
    comfyui_response: dict[str, Any] = field(default_factory=dict)
    prompt_id: str | None = None
    queued_at_ms: int = field(default_factory=now_ms)
    started_at_ms: int | None = None
    generated_at_ms: int | None = None
    completed_at_ms: int | None = None
    preprocess_ms: int = 0
    model_download_ms: int = 0               # waiting for model URLs (0: none, or cached)
    awaiting_models: bool = False            # the runner passes it by until its models are in
    model_leases: list[Any] = field(default_factory=list)  # cache pins, released at the end
    steps: int = 0
    sampling_its: float | None = None
    last_progress: dict[str, Any] | None = None
    cancel_requested: bool = False
    prepared: asyncio.Future | None = None   # the graph, once inputs are uploaded
    persisting: asyncio.Task | None = None   # the write of its "queued" record
    folder_made: Path | None = None          # its output folder, made (empty) while it ran
    done: asyncio.Event = field(default_factory=asyncio.Event)
    listeners: list[asyncio.Queue] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.request.request_id

    def http_status(self) -> int:
        if self.status is JobStatus.COMPLETED:
            return 200
        if self.status is JobStatus.CANCELLED:
            return 499
        if self.status is JobStatus.TIMEOUT:
            return 504
        if self.status is JobStatus.FAILED:
            return HTTP_FOR_FAILURE.get(self.failure or FailureKind.INTERNAL, 500)
        return 200  # still running: /result answers 200 with the current status

    def timings(self) -> dict[str, Any]:
        generation = (self.generated_at_ms - self.started_at_ms
                      if self.generated_at_ms and self.started_at_ms else 0)
        postprocess = (self.completed_at_ms - self.generated_at_ms
                       if self.completed_at_ms and self.generated_at_ms else 0)
        total = (self.completed_at_ms - self.queued_at_ms) if self.completed_at_ms else 0
        return {
            "queued_at_ms": self.queued_at_ms,
            "started_at_ms": self.started_at_ms,
            "queue_ms": (self.started_at_ms - self.queued_at_ms) if self.started_at_ms else 0,
            "preprocess_ms": self.preprocess_ms,
            "model_download_ms": self.model_download_ms,
            "generation_ms": generation,
            "postprocess_ms": postprocess,
            "completed_at_ms": self.completed_at_ms,
            "total_ms": total,
            "steps": self.steps,
            "sampling_its": round(self.sampling_its, 3) if self.sampling_its else None,
        }

    def result(self, include_comfyui_response: bool | None = None) -> dict[str, Any]:
        include = (self.request.include_comfyui_response if include_comfyui_response is None
                   else include_comfyui_response)
        body: dict[str, Any] = {
            "id": self.id,
            "status": self.status.value,
            "message": self.message,
            "output": self.output,
            "timings": self.timings(),
            "comfyui_response": self.comfyui_response if include else {},
        }
        if self.prompt_id:
            body["prompt_id"] = self.prompt_id
        if self.failure:
            body["failure"] = self.failure.value
        body.update(self.detail)
        return body

    def elapsed(self) -> float:
        """Seconds since it was accepted."""
        return round((now_ms() - self.queued_at_ms) / 1000, 3)

    def publish(self, event: dict[str, Any]) -> None:
        for queue in list(self.listeners):
            queue.put_nowait(event)

    def to_record(self) -> dict[str, Any]:
        """What the result store persists: the full result, always with ComfyUI's response."""
        record = self.result(include_comfyui_response=True)
        record["_request"] = self.request.to_record()
        record["_http_status"] = self.http_status()
        return record
