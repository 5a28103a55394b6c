"""The GPU layer's exceptions. NVML's own errors never leave ``nvml.py``."""

from __future__ import annotations


class GpuError(Exception):
    """Base of every error this package raises."""


class GpuReadTimeout(GpuError, TimeoutError):
    """An NVML read did not finish in time (a GPU falling off the bus can hang it)."""


class XidTableError(GpuError, ValueError):
    """The XID table file is malformed; the message names the entry."""


class FakeSourceError(GpuError, ValueError):
    """The fake NVML description (scenario or file) is invalid; the message names the field."""
