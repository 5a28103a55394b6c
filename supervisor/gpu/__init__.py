"""GPU health: NVML readings, XID/ECC events, a health policy and telemetry.

Only ``nvml.py`` imports ``pynvml``; ``fake.py`` stands in for it in tests and
demos (``GPU_FAKE_SOURCE``).
"""

from .errors import FakeSourceError, GpuError, GpuReadTimeout, XidTableError
from .events import EventWatchState, EventWatchStatus, XidEventWatcher
from .model import (
    ClockEventReason,
    EventKind,
    GpuEvent,
    GpuProcess,
    GpuRecord,
    GpuSnapshot,
    GpuState,
    GpuVerdict,
    HealthLevel,
    NvmlState,
    NvmlStatus,
    Severity,
)
from .nvml import AsyncNvmlReader, NvmlReader, read_local_snapshot
from .policy import GpuPolicyThresholds, evaluate
from .sampler import GpuSampler, GpuTelemetry, GpuTrend, TelemetryWindow
from .xid import XidInfo, XidTable, load_xid_table

__all__ = [
    "AsyncNvmlReader", "ClockEventReason", "EventKind", "EventWatchState", "EventWatchStatus",
    "FakeSourceError", "GpuError", "GpuEvent", "GpuPolicyThresholds", "GpuProcess",
    "GpuReadTimeout", "GpuRecord", "GpuSampler", "GpuSnapshot", "GpuState", "GpuTelemetry",
    "GpuTrend", "GpuVerdict", "HealthLevel", "NvmlReader", "NvmlState", "NvmlStatus",
    "Severity", "TelemetryWindow", "XidEventWatcher", "XidInfo", "XidTable", "XidTableError",
    "evaluate", "load_xid_table", "read_local_snapshot",
]
