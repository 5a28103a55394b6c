"""Exceptions of the benchmark package.

    BenchmarkError
    ├── CheckpointMissing    the benchmark model is not installed in ComfyUI
    ├── RunFailed            one run did not produce a result (rejected, failed, timed out, lost)
    │   └── OutputInvalid    it finished, but its image is missing, empty or the wrong size
    └── ReferenceTableError  the reference table cannot be read

``run_benchmark`` turns each of these into a report with status ``error``; they only escape from
the lower-level helpers (``check_png``, ``load_reference``) that callers may use on their own.
"""

from __future__ import annotations


class BenchmarkError(Exception):
    """Base class of every error raised by :mod:`benchmark`."""


class CheckpointMissing(BenchmarkError):
    """The checkpoint the benchmark loads is not among the ones ComfyUI lists."""

    def __init__(self, checkpoint: str, message: str) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class RunFailed(BenchmarkError):
    """One benchmark run did not complete."""


class OutputInvalid(RunFailed):
    """A run completed but its output is not the image that was asked for."""


class ReferenceTableError(BenchmarkError):
    """The GPU reference table is missing or malformed."""
