"""How a request ends, decided from what happened to it: pure functions from an error or from
ComfyUI's result to an `Outcome` (status, message for the client, kind of failure, detail)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from api.comfy import (
    ComfyConnectionError,
    ComfyHTTPError,
    ComfyUnreachable,
    PromptRejected,
    PromptResult,
    PromptStatus,
    PromptVanished,
)
from api.contract.result import FailureKind, JobStatus
from api.wrapper.diskfull import FIX, DiskFull, says_full
from api.wrapper.inputs import InputError


@dataclass(frozen=True)
class Outcome:
    status: JobStatus
    message: str
    failure: FailureKind | None = None
    detail: dict[str, Any] = field(default_factory=dict)


INTERNAL_ERROR = Outcome(JobStatus.FAILED, "Internal error in the wrapper.", FailureKind.INTERNAL)
OUTPUTS_FAILED = Outcome(JobStatus.FAILED, "Internal error while collecting outputs.",
                         FailureKind.INTERNAL)
CANCELLED_QUEUED = Outcome(JobStatus.CANCELLED, "Cancelled while queued.")
CANCELLED_BEFORE_START = Outcome(JobStatus.CANCELLED, "Cancelled before it started.")


def of_inputs(exc: InputError | ComfyConnectionError | ComfyHTTPError | DiskFull) -> Outcome:
    """Preparing the inputs failed (the job's `prepared` future holds the error)."""
    if isinstance(exc, InputError):
        return Outcome(JobStatus.FAILED, f"Input rejected: {exc}", FailureKind.INVALID,
                       {"errors": {"input": str(exc)}})
    if isinstance(exc, DiskFull):
        return disk_full(exc)
    if isinstance(exc, ComfyHTTPError):  # e.g. /upload/image refused, with room on the disk
        return Outcome(JobStatus.FAILED, f"ComfyUI refused the input image: {exc}",
                       FailureKind.COMFYUI_LOST)
    return Outcome(JobStatus.FAILED, f"ComfyUI unreachable: {exc}", FailureKind.COMFYUI_LOST)


def disk_full(exc: DiskFull) -> Outcome:
    """A folder the request needed is on a full filesystem (507)."""
    return Outcome(JobStatus.FAILED, str(exc), FailureKind.DISK_FULL)


def with_room(outcome: Outcome, room: str) -> Outcome:
    """ComfyUI's disk-full failure told whole: how full the folder is (`room`, when known) and
    what to do."""
    where = f"; {room}" if room else ""
    return replace(outcome, message=f"{outcome.message}{where}; {FIX}")


def timed_out(seconds: float) -> Outcome:
    return Outcome(JobStatus.TIMEOUT,
                   f"Timed out after {seconds:g} s; the prompt was interrupted.")


def of_error(exc: Exception, cancel_requested: bool) -> Outcome | None:
    """Running the prompt failed; None for an error that is not ComfyUI's (a bug)."""
    if isinstance(exc, PromptRejected):
        return Outcome(JobStatus.FAILED,
                       f"ComfyUI rejected the workflow: {exc.error.get('message', '')}",
                       FailureKind.INVALID, {"error": exc.error, "node_errors": exc.node_errors})
    if isinstance(exc, PromptVanished):
        if cancel_requested:  # we removed it from ComfyUI's queue ourselves
            return CANCELLED_BEFORE_START
        return Outcome(JobStatus.FAILED, f"ComfyUI lost the prompt: {exc}",
                       FailureKind.COMFYUI_LOST)
    if isinstance(exc, ComfyHTTPError):  # ComfyUI (or what answers on its port) misbehaved
        return Outcome(JobStatus.FAILED, f"ComfyUI answered badly: {exc}",
                       FailureKind.COMFYUI_LOST)
    if isinstance(exc, ComfyConnectionError):
        what = "unreachable" if isinstance(exc, ComfyUnreachable) else "lost"
        return Outcome(JobStatus.FAILED, f"ComfyUI {what}: {exc}", FailureKind.COMFYUI_LOST)
    return None


def of_result(result: PromptResult, cancel_requested: bool) -> Outcome | None:
    """ComfyUI ran the prompt; None when it succeeded (its outputs are collected next)."""
    if result.status is PromptStatus.INTERRUPTED:
        if cancel_requested:
            return Outcome(JobStatus.CANCELLED, "Cancelled while running.")
        return Outcome(JobStatus.FAILED, "Interrupted in ComfyUI by someone else.",
                       FailureKind.EXECUTION)
    if result.status is PromptStatus.FAILED:
        err = result.error
        if err is None:
            return Outcome(JobStatus.FAILED, "ComfyUI failed in a node: unknown error",
                           FailureKind.EXECUTION)
        detail = {"error": {"type": "execution_error", "node_id": err.node_id,
                            "node_type": err.node_type, "exception_type": err.exception_type,
                            "exception_message": err.exception_message}}
        if says_full(err.exception_message):
            return Outcome(JobStatus.FAILED,
                           f"disk full: ComfyUI could not write in node {err.node_id} "
                           f"({err.node_type}): {err.exception_type}: "
                           f"{err.exception_message}", FailureKind.DISK_FULL, detail)
        return Outcome(JobStatus.FAILED,
                       f"ComfyUI failed in node {err.node_id} ({err.node_type}): "
                       f"{err.exception_type}: {err.exception_message}",
                       FailureKind.EXECUTION, detail)
    return None


def completed(failed_uploads: int) -> Outcome:
    if not failed_uploads:
        return Outcome(JobStatus.COMPLETED, "Processing complete.")
    return Outcome(JobStatus.COMPLETED, f"Processing complete; {failed_uploads} upload(s) "
                                        "failed, the files are kept on disk.")
