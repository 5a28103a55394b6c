"""The newest ComfyUI's jobs view (``/api/jobs``): queue items and history entries as one kind
of record, with a status, counts and a preview.

Status: a queued prompt is ``pending``, the running one ``in_progress``; a finished one is
``completed`` (``status_str`` success), ``cancelled`` (error, and ``execution_interrupted``
among its messages) or ``failed`` (any other error). Keys whose value is None are left out.
"""

from __future__ import annotations

import enum
import uuid
from typing import Any, Iterable, Mapping, Sequence

from simulator.prompt_queue import QueueItem

# Media keys the frontend can preview; other keys (latents...) count as outputs only.
_PREVIEWABLE = frozenset({"images", "video", "audio", "3d", "text"})
_THREE_D = (".obj", ".fbx", ".gltf", ".glb", ".usdz")
_TEXT_FILES = (".txt", ".md", ".json")
_TEXT_PREVIEW_LIMIT = 1024


class JobStatus(str, enum.Enum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ALL_STATUSES = [s.value for s in JobStatus]
_HISTORY_STATUSES = {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}


class SortKey(str, enum.Enum):
    CREATED_AT = "created_at"
    EXECUTION_DURATION = "execution_duration"


def is_canonical_uuid(value: Any) -> bool:
    """A job (prompt) id the newest ComfyUI accepts: a string in lowercase hyphenated UUID form."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _without_none(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if v is not None}


def _metadata(extra_data: Mapping[str, Any]) -> tuple[Any, Any]:
    workflow = (extra_data.get("extra_pnginfo") or {}).get("workflow") or {}
    return extra_data.get("create_time"), workflow.get("id") if isinstance(workflow, dict) else None


def queue_job(item: QueueItem, status: JobStatus, with_workflow: bool = False) -> dict[str, Any]:
    create_time, workflow_id = _metadata(item.extra_data)
    job = _without_none({"id": item.prompt_id, "status": status.value, "priority": item.number,
                         "create_time": create_time, "outputs_count": 0, "previewable_outputs_count": 0,
                         "workflow_id": workflow_id})
    if with_workflow:
        job["workflow"] = {"prompt": item.prompt, "extra_data": item.extra_data}
    return job


def _is_previewable(media: str, item: Mapping[str, Any]) -> bool:
    if media in _PREVIEWABLE:
        return True
    fmt = str(item.get("format", ""))
    if fmt.startswith(("video/", "audio/")):
        return True
    return str(item.get("filename", "")).lower().endswith(_THREE_D + _TEXT_FILES)


def _file_items(outputs: Mapping[str, Any]) -> Iterable[tuple[str, str, Any]]:
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media, items in node_outputs.items():
            if media == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, str) and item.lower().endswith(_THREE_D):
                    item = {"filename": item, "type": "output", "subfolder": "", "mediaType": "3d"}
                yield node_id, media, item


def outputs_summary(outputs: Mapping[str, Any]) -> tuple[int, int, dict[str, Any] | None]:
    """(outputs counted, previewable ones, the preview): a saved visual output first, then any
    other visual one, then a saved text file, then raw text."""
    count = previewable = 0
    saved = other = text_file = raw_text = None
    for node_id, media, item in _file_items(outputs):
        if not isinstance(item, dict):
            if media == "text" and raw_text is None and item is not None:
                text = item[0] if isinstance(item, tuple) and item else str(item)
                raw_text = {"content": text[:_TEXT_PREVIEW_LIMIT], "nodeId": node_id, "mediaType": media}
                if len(text) > _TEXT_PREVIEW_LIMIT:
                    raw_text["truncated"] = True
            continue
        count += 1
        if not _is_previewable(media, item):
            continue
        previewable += 1
        shown = {**item, "nodeId": node_id}
        shown.setdefault("mediaType", media)
        if media == "text" or str(item.get("filename", "")).lower().endswith(_TEXT_FILES):
            text_file = text_file or shown
        elif item.get("type") == "output":
            saved = saved or shown
        else:
            other = other or shown
    return count, previewable, saved or other or text_file or raw_text


def _normalised_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            out[node_id] = node_outputs
            continue
        out[node_id] = {}
        for media, items in node_outputs.items():
            if media == "animated" or not isinstance(items, list):
                out[node_id][media] = items
                continue
            fixed = []
            for item in items:
                if item is None:
                    continue
                if isinstance(item, str) and item.lower().endswith(_THREE_D):
                    item = {"filename": item, "type": "output", "subfolder": "", "mediaType": "3d"}
                fixed.append(item)
            out[node_id][media] = fixed
    return out


def history_job(prompt_id: str, entry: Mapping[str, Any], with_outputs: bool = False) -> dict[str, Any]:
    number, _, prompt, extra_data, _ = entry["prompt"]
    create_time, workflow_id = _metadata(extra_data)
    status_info = entry.get("status") or {}
    started = ended = error = None
    interrupted = False
    for message in status_info.get("messages", []):
        if not isinstance(message, (list, tuple)) or len(message) < 2 or not isinstance(message[1], dict):
            continue
        event, data = message[0], message[1]
        if event == "execution_start":
            started = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            ended = data.get("timestamp")
            if event == "execution_error":
                error = data
            elif event == "execution_interrupted":
                interrupted = True
    if status_info.get("status_str") == "error":
        status = JobStatus.CANCELLED if interrupted else JobStatus.FAILED
    else:
        status = JobStatus.COMPLETED
    outputs = entry.get("outputs") or {}
    count, previewable, preview = outputs_summary(outputs)
    job = _without_none({
        "id": prompt_id, "status": status.value, "priority": number, "create_time": create_time,
        "execution_start_time": started, "execution_end_time": ended, "execution_error": error,
        "outputs_count": count, "previewable_outputs_count": previewable, "preview_output": preview,
        "workflow_id": workflow_id,
    })
    if with_outputs:
        job["outputs"] = _normalised_outputs(outputs)
        job["execution_status"] = status_info
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def find_job(prompt_id: str, running: Sequence[QueueItem], pending: Sequence[QueueItem],
             history: Mapping[str, Any]) -> dict[str, Any] | None:
    """One job with full detail; the caller snapshots running and pending before history, so a
    prompt that finishes between the two reads is found in history, never lost."""
    if prompt_id in history:
        return history_job(prompt_id, history[prompt_id], with_outputs=True)
    for item in running:
        if item.prompt_id == prompt_id:
            return queue_job(item, JobStatus.IN_PROGRESS, with_workflow=True)
    for item in pending:
        if item.prompt_id == prompt_id:
            return queue_job(item, JobStatus.PENDING, with_workflow=True)
    return None


def list_jobs(running: Sequence[QueueItem], pending: Sequence[QueueItem], history: Mapping[str, Any],
              statuses: Sequence[JobStatus], workflow_id: str | None, sort_by: SortKey, descending: bool,
              limit: int | None, offset: int) -> tuple[list[dict[str, Any]], int]:
    """(one page of jobs, how many matched)."""
    jobs: list[dict[str, Any]] = []
    if JobStatus.IN_PROGRESS in statuses:
        jobs += [queue_job(item, JobStatus.IN_PROGRESS) for item in running]
    if JobStatus.PENDING in statuses:
        jobs += [queue_job(item, JobStatus.PENDING) for item in pending]
    wanted = _HISTORY_STATUSES & set(statuses)
    if wanted:
        for prompt_id, entry in history.items():
            job = history_job(prompt_id, entry)
            if JobStatus(job["status"]) in wanted:
                jobs.append(job)
    if workflow_id:
        jobs = [job for job in jobs if job.get("workflow_id") == workflow_id]

    def key(job: dict[str, Any]) -> Any:
        if sort_by is SortKey.EXECUTION_DURATION:
            start, end = job.get("execution_start_time", 0), job.get("execution_end_time", 0)
            return end - start if start and end else 0
        return job.get("create_time", 0)

    jobs.sort(key=key, reverse=descending)
    total = len(jobs)
    page = jobs[offset:] if offset > 0 else jobs
    return (page[:limit] if limit is not None else page), total
