"""The result's vocabulary: a request's statuses, why one failed, and the HTTP status of each.

Shared by the wrapper (which sets them) and the API documents (which list them).
"""

from __future__ import annotations

import enum
import time


class JobStatus(str, enum.Enum):
    PENDING = "pending"          # queued, waiting for ComfyUI
    PROCESSING = "processing"    # inputs being fetched and uploaded
    GENERATING = "generating"    # ComfyUI is running the prompt
    GENERATED = "generated"      # outputs being collected, uploaded
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMEOUT}


class FailureKind(str, enum.Enum):
    """Why a request failed; each kind has one HTTP status."""

    INVALID = "invalid"              # the request or the workflow is wrong (400)
    EXECUTION = "execution"          # a node raised while running (422)
    COMFYUI_LOST = "comfyui_lost"    # ComfyUI unreachable or gone mid-prompt (502)
    RESTARTED = "restarted"          # the wrapper restarted while it ran (502)
    DISK_FULL = "disk_full"          # a folder it needed is on a full filesystem (507)
    INTERNAL = "internal"            # a bug in the wrapper (500)


HTTP_FOR_FAILURE = {
    FailureKind.INVALID: 400,
    FailureKind.EXECUTION: 422,
    FailureKind.COMFYUI_LOST: 502,
    FailureKind.RESTARTED: 502,
    FailureKind.DISK_FULL: 507,
    FailureKind.INTERNAL: 500,
}


def now_ms() -> int:
    return int(time.time() * 1000)
