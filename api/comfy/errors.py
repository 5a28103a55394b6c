"""Exceptions raised by the ComfyUI client.

The hierarchy is small on purpose; callers map it to HTTP statuses:

    ComfyError
    ├── ComfyConnectionError      ComfyUI could not be talked to (502)
    │   ├── ComfyUnreachable      ... before anything was submitted
    │   └── ComfyLost             ... while a prompt was in flight
    ├── ComfyHTTPError            ComfyUI answered with an unexpected status or body
    ├── PromptRejected            ComfyUI refused the prompt (its 400, kept intact)
    └── PromptVanished            the prompt is in neither the queue nor the history
"""

from __future__ import annotations

from typing import Any


class ComfyError(Exception):
    """Base class of every error raised by :mod:`api.comfy`."""


class ComfyConnectionError(ComfyError):
    """ComfyUI could not be reached; ``reason`` says what failed, in words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ComfyUnreachable(ComfyConnectionError):
    """Connection refused, DNS failure or timeout before a prompt was submitted.

    Nothing reached ComfyUI's queue, so the request may be retried elsewhere.
    """


class ComfyLost(ComfyConnectionError):
    """ComfyUI went away while a prompt was queued or running.

    Raised when the WebSocket dropped and neither a reconnect nor an HTTP request
    succeeded within ``ClientTimeouts.lost_after`` seconds. The prompt's fate is
    unknown (a restarted ComfyUI has forgotten it).
    """

    def __init__(self, reason: str, prompt_id: str | None = None) -> None:
        super().__init__(reason)
        self.prompt_id = prompt_id


class ComfyHTTPError(ComfyError):
    """ComfyUI answered, but not as its API promises (a 500, a body that is not JSON)."""

    def __init__(self, method: str, path: str, status: int, text: str) -> None:
        super().__init__(f"{method} {path} answered HTTP {status}: {text[:300]}")
        self.method = method
        self.path = path
        self.status = status
        self.text = text


class PromptRejected(ComfyError):
    """ComfyUI refused the prompt at ``POST /prompt`` (validation failed).

    ``body`` is ComfyUI's JSON answer, untouched, so it can be passed on to the
    user: ``{"error": {"type", "message", "details", "extra_info"}, "node_errors": {...}}``.
    """

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        error = self.error
        message = error.get("message") or "prompt rejected"
        if error.get("details"):
            message = f"{message}: {error['details']}"
        super().__init__(f"ComfyUI rejected the prompt (HTTP {status}, {self.error_type}): {message}")

    @property
    def error(self) -> dict[str, Any]:
        error = self.body.get("error")
        if isinstance(error, dict):
            return error
        # Some ComfyUI forks answer with a bare string; keep it readable.
        return {"type": "unknown", "message": str(error) if error is not None else ""}

    @property
    def error_type(self) -> str:
        return str(self.error.get("type") or "unknown")

    @property
    def node_errors(self) -> dict[str, Any]:
        node_errors = self.body.get("node_errors")
        return node_errors if isinstance(node_errors, dict) else {}


class PromptVanished(ComfyError):
    """The prompt is neither queued, running nor in the history.

    It was deleted from the queue, the history was cleared, or ComfyUI was
    restarted between two polls. Waiting longer would never end.
    """

    def __init__(self, prompt_id: str) -> None:
        super().__init__(f"prompt {prompt_id} is in neither the queue nor the history of ComfyUI")
        self.prompt_id = prompt_id
