"""Typed records exchanged with the ComfyUI client.

Everything the client returns or passes to ``on_event`` is one of these
dataclasses; ComfyUI's raw JSON is kept next to them (``raw``/``history``) for
callers that must forward it untouched.
"""

from __future__ import annotations

import mimetypes
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

# mimetypes does not know every extension ComfyUI writes.
_EXTRA_MIMETYPES = {
    ".webp": "image/webp",
    ".webm": "video/webm",
    ".mp4": "video/mp4",
    ".flac": "audio/flac",
    ".opus": "audio/ogg",
    ".mp3": "audio/mpeg",
    ".glb": "model/gltf-binary",
    ".latent": "application/octet-stream",
    ".safetensors": "application/octet-stream",
}


@dataclass(frozen=True)
class ClientTimeouts:
    """Every timeout the client uses, in seconds.

    connect:       TCP connect and WebSocket handshake.
    request:       one whole HTTP request (upload included).
    ws_idle:       no frame about our prompt for this long -> poll ``/history`` and ``/queue``.
    poll_interval: period of those polls once they have started (and while the WebSocket is down).
    lost_after:    the WebSocket dropped and no reconnect or HTTP request has succeeded
                   for this long -> :class:`~api.comfy.errors.ComfyLost`.
    submit:        ``POST /prompt``'s answer; past it (or when the connection drops before the
                   answer) one look-up by prompt id says whether ComfyUI has the prompt.
    """

    connect: float = 5.0
    request: float = 30.0
    ws_idle: float = 10.0
    poll_interval: float = 1.0
    lost_after: float = 1.0
    submit: float = 30.0

    def __post_init__(self) -> None:
        for name in ("connect", "request", "ws_idle", "poll_interval", "lost_after", "submit"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ClientTimeouts.{name} must be > 0, got {getattr(self, name)!r}")


class PromptStatus(str, Enum):
    """How a prompt ended."""

    SUCCESS = "success"
    FAILED = "failed"  # an execution_error: a node raised
    INTERRUPTED = "interrupted"  # POST /interrupt (or a cancel) stopped it


@dataclass(frozen=True)
class Submission:
    """ComfyUI's answer to a successful ``POST /prompt``.

    ``node_errors`` may be non-empty on success: outputs that failed validation
    are dropped while the others run.
    """

    prompt_id: str
    number: float | None  # None when the answer was lost and a look-up found the prompt
    node_errors: dict[str, Any]
    client_id: str | None = None


class JobState(str, Enum):
    """A prompt's status in ComfyUI's jobs API (``GET /api/jobs/{id}``)."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobInfo:
    """One job of ComfyUI's jobs API; ``raw`` is ComfyUI's JSON, untouched."""

    id: str
    status: JobState
    priority: float | None
    create_time: int | None            # epoch ms
    execution_start_time: int | None   # epoch ms, once finished
    execution_end_time: int | None
    outputs_count: int
    execution_error: dict[str, Any] | None
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> JobInfo:
        def number(key: str) -> Any:
            value = raw.get(key)
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        error = raw.get("execution_error")
        return cls(id=str(raw.get("id", "")), status=JobState(raw.get("status")),
                   priority=number("priority"), create_time=number("create_time"),
                   execution_start_time=number("execution_start_time"),
                   execution_end_time=number("execution_end_time"),
                   outputs_count=int(number("outputs_count") or 0),
                   execution_error=error if isinstance(error, dict) else None, raw=raw)


@dataclass(frozen=True)
class JobPage:
    """One page of ``GET /api/jobs``."""

    jobs: list[JobInfo]
    total: int
    has_more: bool
    offset: int
    limit: int | None


class PromptPlace(str, Enum):
    """Where one look-up found a prompt."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"          # finished: success, failure or interrupt (its history says which)
    UNKNOWN = "unknown"    # ComfyUI has no such prompt (never queued, removed, or restarted)


@dataclass(frozen=True)
class PromptLookup:
    place: PromptPlace
    history: dict[str, Any] | None = None  # the /history entry, when the look-up read it


@dataclass(frozen=True)
class QueueSnapshot:
    """Prompt ids from ``GET /queue``; ``pending`` is in execution order."""

    running: list[str]
    pending: list[str]

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self.running or prompt_id in self.pending


@dataclass(frozen=True)
class UploadedFile:
    """Where ComfyUI stored an upload; ``name`` may differ from the name sent."""

    name: str
    subfolder: str
    type: str


@dataclass(frozen=True)
class Device:
    name: str
    type: str
    index: int | None
    vram_total: int  # bytes
    vram_free: int  # bytes
    torch_vram_total: int | None = None
    torch_vram_free: int | None = None


@dataclass(frozen=True)
class SystemStats:
    comfyui_version: str
    python_version: str
    pytorch_version: str
    devices: list[Device]
    is_simulator: bool
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SystemStats:
        system = raw.get("system") or {}
        devices = []
        for item in raw.get("devices") or []:
            if not isinstance(item, dict):
                continue
            devices.append(
                Device(
                    name=str(item.get("name", "")),
                    type=str(item.get("type", "")),
                    index=item.get("index"),
                    vram_total=int(item.get("vram_total") or 0),
                    vram_free=int(item.get("vram_free") or 0),
                    torch_vram_total=item.get("torch_vram_total"),
                    torch_vram_free=item.get("torch_vram_free"),
                )
            )
        return cls(
            comfyui_version=str(system.get("comfyui_version", "")),
            python_version=str(system.get("python_version", "")),
            pytorch_version=str(system.get("pytorch_version", "")),
            devices=devices,
            is_simulator=_looks_like_simulator(raw),
            raw=raw,
        )


def _looks_like_simulator(raw: dict[str, Any]) -> bool:
    # The project's simulator marks itself; a real ComfyUI never sends these keys.
    system = raw.get("system") or {}
    if raw.get("simulator") or system.get("simulator"):
        return True
    return "simulator" in str(system.get("comfyui_version", "")).lower()


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class OutputFile:
    """One file written by an output node (an item of ``images``, ``gifs``, ``latents``...)."""

    node_id: str
    output_type: str  # the list key in the node's output: images, gifs, videos, audio, latents...
    filename: str
    subfolder: str
    type: str  # ComfyUI's folder type: output (or temp for previews)
    local_path: Path | None  # absolute; None when the folder is unknown or the name escapes it
    mimetype: str

    @property
    def view_params(self) -> dict[str, str]:
        """Query parameters for ``GET /view`` that return this file."""
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


@dataclass(frozen=True)
class TextOutput:
    """A string an output node returned in its UI output (``{"text": ["..."]}``); no file exists."""

    node_id: str
    output_type: str
    text: str


@dataclass(frozen=True)
class ExecutionFailure:
    """The ``execution_error`` ComfyUI reported for a failed prompt."""

    node_id: str | None
    node_type: str | None
    exception_type: str
    exception_message: str
    traceback: list[str]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_message(cls, data: dict[str, Any]) -> ExecutionFailure:
        tb = data.get("traceback") or []
        if isinstance(tb, str):
            tb = [tb]
        return cls(
            node_id=_opt_str(data.get("node_id")),
            node_type=_opt_str(data.get("node_type")),
            exception_type=str(data.get("exception_type") or ""),
            exception_message=str(data.get("exception_message") or "").strip(),
            traceback=[str(line) for line in tb],
            raw=data,
        )


@dataclass(frozen=True)
class SamplingStats:
    """Steps seen in ``progress`` frames of the sampler nodes.

    ``seconds`` spans from each node's first progress frame to its last, so the
    first step (which also absorbs model loading) is not counted in ``its``.
    All zero/None when the WebSocket delivered no progress (e.g. it stalled).
    """

    steps: int = 0
    seconds: float = 0.0
    its: float | None = None


@dataclass(frozen=True)
class PromptResult:
    prompt_id: str
    status: PromptStatus
    outputs: list[OutputFile]
    error: ExecutionFailure | None = None
    sampling: SamplingStats = field(default_factory=SamplingStats)
    texts: list[TextOutput] = field(default_factory=list)
    previews: list[OutputFile] = field(default_factory=list)  # type 'temp' items (PreviewImage)
    node_errors: dict[str, Any] = field(default_factory=dict)  # from the 200 of POST /prompt
    interrupted_node: str | None = None
    number: float | None = None
    queued_at: float | None = None  # epoch seconds: POST /prompt answered
    started_at: float | None = None  # epoch seconds: execution_start
    finished_at: float | None = None  # epoch seconds: success / error / interrupt
    history: dict[str, Any] = field(default_factory=dict, repr=False)  # raw /history/{id} entry
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.status is PromptStatus.SUCCESS

    @property
    def execution_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class ComfyEvent:
    """Base of everything passed to ``on_event``."""

    prompt_id: str


@dataclass(frozen=True)
class Queued(ComfyEvent):
    number: float | None
    node_errors: dict[str, Any]


@dataclass(frozen=True)
class ExecutionStarted(ComfyEvent):
    pass


@dataclass(frozen=True)
class Cached(ComfyEvent):
    nodes: list[str]


@dataclass(frozen=True)
class Executing(ComfyEvent):
    node: str


@dataclass(frozen=True)
class Progress(ComfyEvent):
    node: str | None
    value: float
    max: float
    its_per_second: float | None  # smoothed over recent steps; None until two steps were seen
    elapsed: float  # seconds since this node started executing


@dataclass(frozen=True)
class Executed(ComfyEvent):
    node: str
    output: dict[str, Any]


@dataclass(frozen=True)
class Finished(ComfyEvent):
    """The last event of every followed prompt."""

    result: PromptResult


ComfyEventT = Queued | ExecutionStarted | Cached | Executing | Progress | Executed | Finished


# --------------------------------------------------------------------------- parsing


def guess_mimetype(filename: str) -> str:
    ext = os.path.splitext(filename)[1].lower()
    if ext in _EXTRA_MIMETYPES:
        return _EXTRA_MIMETYPES[ext]
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def resolve_local_path(root: Path | None, subfolder: str, filename: str) -> Path | None:
    """``root/subfolder/filename``, or None when it would lie outside ``root``."""
    if root is None or not filename:
        return None
    root_str = os.path.abspath(root)
    candidate = os.path.normpath(os.path.join(root_str, subfolder or "", filename))
    if os.path.commonpath([root_str, candidate]) != root_str or candidate == root_str:
        return None
    return Path(candidate)


@dataclass
class ParsedOutputs:
    files: list[OutputFile] = field(default_factory=list)
    previews: list[OutputFile] = field(default_factory=list)
    texts: list[TextOutput] = field(default_factory=list)


def parse_node_outputs(
    outputs: dict[str, Any], *, output_dir: Path | None, temp_dir: Path | None
) -> ParsedOutputs:
    """Flatten ``{node_id: {list_key: [items]}}`` from the history (or ``executed`` frames).

    Items with a ``filename`` are files (``type: temp`` ones are previews);
    plain strings are texts; anything else (``"animated": [true]``) is metadata
    and stays only in the raw history.
    """
    parsed = ParsedOutputs()
    for node_id, node_output in outputs.items():
        if not isinstance(node_output, dict):
            continue
        for output_type, items in node_output.items():
            if isinstance(items, (str, dict)):
                items = [items]
            if not isinstance(items, (list, tuple)):
                continue
            for item in items:
                if isinstance(item, str):
                    parsed.texts.append(TextOutput(str(node_id), output_type, item))
                    continue
                if not isinstance(item, dict) or not item.get("filename"):
                    continue
                filename = str(item["filename"])
                subfolder = str(item.get("subfolder") or "")
                folder_type = str(item.get("type") or "output")
                root = {"output": output_dir, "temp": temp_dir}.get(folder_type)
                record = OutputFile(
                    node_id=str(node_id),
                    output_type=output_type,
                    filename=filename,
                    subfolder=subfolder,
                    type=folder_type,
                    local_path=resolve_local_path(root, subfolder, filename),
                    mimetype=guess_mimetype(filename),
                )
                (parsed.previews if folder_type == "temp" else parsed.files).append(record)
    return parsed


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
