"""Turning a GPU snapshot and recent events into a verdict with human reasons."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from .model import (
    ClockEventReason,
    EventKind,
    GpuEvent,
    GpuRecord,
    GpuSnapshot,
    GpuState,
    GpuVerdict,
    HealthLevel,
    Severity,
)

OK, DEGRADED, UNHEALTHY = HealthLevel.OK, HealthLevel.DEGRADED, HealthLevel.UNHEALTHY


@dataclass(frozen=True)
class GpuPolicyThresholds:
    # Within this many degrees C of the slowdown threshold: degraded.
    temp_margin_c: float = 5.0
    # Within this many degrees C of the shutdown threshold: unhealthy. Smaller
    # than the slowdown margin: on many boards the two thresholds are only a
    # few degrees apart.
    shutdown_margin_c: float = 2.0
    # Enforced power limit below this share of the default limit: degraded
    # (someone capped the board; it will run slower than its benchmark).
    power_cap_ratio: float = 0.9
    # A link below its maximum only counts while the GPU is this busy: idle
    # GPUs drop to a lower PCIe generation on purpose, to save power.
    pcie_busy_util_pct: float = 30.0
    # PCIe replays (a since-boot counter) above this: degraded. None: not checked.
    pcie_replay_max: int | None = None
    # Uncorrected ECC errors since the last reset above this: unhealthy.
    ecc_uncorrected_max: int = 0
    # Retired pages at or above this: unhealthy (NVIDIA's service limit is near 64).
    retired_pages_max: int = 60
    # Processes not in our tree using at least this much memory are noted...
    foreign_process_min_mib: float = 256.0
    # ...and make the verdict degraded when set. Off by default: inside a
    # container NVML reports host PIDs, which never match ours.
    foreign_process_degrades: bool = False
    # Warning and info events older than this are forgotten; critical ones
    # stay until the daemon restarts, since they need a reset or a reboot.
    event_window_s: float = 900.0


def _n(value: float) -> str:
    return f"{value:.0f}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


class _Findings:
    def __init__(self) -> None:
        self.level = OK
        self.reasons: list[str] = []
        self.notes: list[str] = []

    def add(self, level: HealthLevel, text: str) -> None:
        if level is OK:
            self.notes.append(text)
            return
        self.reasons.append(text)
        if level.rank > self.level.rank:
            self.level = level

    def verdict(self) -> GpuVerdict:
        return GpuVerdict(level=self.level, reasons=self.reasons, notes=self.notes)


def _check_thermal(g: GpuRecord, t: GpuPolicyThresholds, out: _Findings) -> None:
    p = f"GPU {g.index}:"
    temp, slow, shut = g.temperature.current_c, g.temperature.slowdown_c, g.temperature.shutdown_c
    reasons = set(g.clocks.event_reasons or ())
    at = f" at {_n(temp)} °C" if temp is not None else ""
    limit = f" (slowdown at {_n(slow)} °C)" if slow is not None else ""
    thermal = False
    # A hardware slowdown halves the clocks or worse: the node is not fit to take work until it
    # clears. The software slowdown is the driver's gentler step: degraded.
    if ClockEventReason.HW_THERMAL_SLOWDOWN in reasons:
        out.add(UNHEALTHY, f"{p} HW thermal slowdown{at}{limit}")
        thermal = True
    if ClockEventReason.SW_THERMAL_SLOWDOWN in reasons:
        out.add(DEGRADED, f"{p} SW thermal slowdown{at}{limit}")
        thermal = True
    if ClockEventReason.HW_POWER_BRAKE in reasons:
        out.add(UNHEALTHY, f"{p} HW power brake slowdown (external power brake asserted)")
    elif ClockEventReason.HW_SLOWDOWN in reasons and not thermal:
        # HW slowdown is the umbrella bit; report it alone only when neither
        # specific cause is set.
        out.add(UNHEALTHY, f"{p} HW slowdown{at}")
    if temp is None:
        return
    if shut is not None and temp >= shut - t.shutdown_margin_c:
        out.add(UNHEALTHY, f"{p} {_n(temp)} °C, near shutdown at {_n(shut)} °C")
    elif slow is not None and not thermal and temp >= slow - t.temp_margin_c:
        out.add(DEGRADED, f"{p} {_n(temp)} °C, within {_n(t.temp_margin_c)} °C of slowdown at {_n(slow)} °C")


def _check_power(g: GpuRecord, t: GpuPolicyThresholds, out: _Findings) -> None:
    enforced, default = g.power.enforced_limit_w, g.power.default_limit_w
    if enforced is not None and default and enforced < t.power_cap_ratio * default:
        out.add(DEGRADED, f"GPU {g.index}: power capped at {_n(enforced)} W (default {_n(default)} W)")


def _check_pcie(g: GpuRecord, t: GpuPolicyThresholds, out: _Findings) -> None:
    link, util = g.pcie, g.utilization.gpu_pct
    known = None not in (link.gen, link.max_gen, link.width, link.max_width)
    if known and util is not None and util >= t.pcie_busy_util_pct:
        if link.gen < link.max_gen or link.width < link.max_width:  # type: ignore[operator]
            out.add(DEGRADED, f"GPU {g.index}: PCIe link Gen{link.gen} x{link.width} "
                              f"(max Gen{link.max_gen} x{link.max_width}) while busy")
    if t.pcie_replay_max is not None and link.replay_counter is not None:
        if link.replay_counter > t.pcie_replay_max:
            out.add(DEGRADED, f"GPU {g.index}: {link.replay_counter} PCIe replays "
                              f"(limit {t.pcie_replay_max})")


def _check_memory_health(g: GpuRecord, t: GpuPolicyThresholds, out: _Findings) -> None:
    p = f"GPU {g.index}:"
    uncorrected = g.ecc.volatile_uncorrected
    if uncorrected is not None and uncorrected > t.ecc_uncorrected_max:
        out.add(UNHEALTHY, f"{p} {_plural(uncorrected, 'uncorrected ECC error')} (volatile)")
    rows = g.remapped_rows
    if rows.failure:
        out.add(UNHEALTHY, f"{p} row remap failed")
    if rows.pending:
        out.add(DEGRADED, f"{p} row remap pending")
    pages = g.retired_pages
    total = pages.total
    if total is not None and total >= t.retired_pages_max:
        out.add(UNHEALTHY, f"{p} {total} retired pages (limit {t.retired_pages_max})")
    if pages.pending:
        out.add(DEGRADED, f"{p} page retirement pending")


def _check_processes(g: GpuRecord, t: GpuPolicyThresholds, out: _Findings) -> None:
    level = DEGRADED if t.foreign_process_degrades else OK
    for proc in g.foreign_processes:
        if proc.used_mib is None:
            out.add(level, f"GPU {g.index}: foreign process {proc.pid}")
        elif proc.used_mib >= t.foreign_process_min_mib:
            out.add(level, f"GPU {g.index}: foreign process {proc.pid} using {_n(proc.used_mib)} MiB")


def _check_events(events: Iterable[GpuEvent], now: float, t: GpuPolicyThresholds, out: _Findings) -> None:
    counts: Counter[tuple[int | None, EventKind, int | None, str, Severity]] = Counter()
    for e in events:
        if e.severity is not Severity.CRITICAL and now - e.monotonic > t.event_window_s:
            continue
        counts[(e.gpu_index, e.kind, e.xid, e.meaning, e.severity)] += 1
    level_of = {Severity.INFO: OK, Severity.WARNING: DEGRADED, Severity.CRITICAL: UNHEALTHY}
    for (gpu, kind, xid, meaning, severity), count in counts.items():
        what = f"XID {xid} ({meaning})" if kind is EventKind.XID else meaning
        times = f" x{count}" if count > 1 else ""
        out.add(level_of[severity], f"GPU {'?' if gpu is None else gpu}: {what}{times}")


def evaluate(
    snapshot: GpuSnapshot,
    events: Iterable[GpuEvent] = (),
    required: bool = True,
    thresholds: GpuPolicyThresholds | None = None,
    *,
    now: float | None = None,
) -> GpuVerdict:
    """Judge the GPUs. ``required``: whether this worker needs a GPU at all.

    ``now`` (``time.monotonic()``, default the snapshot's) ages out
    non-critical events.
    """
    t = thresholds or GpuPolicyThresholds()
    out = _Findings()
    status = snapshot.status
    if not status.available:
        text = f"no NVIDIA driver/NVML: {status.error}"
        out.add(UNHEALTHY if required else OK, text if required else f"{text} (GPU not required)")
        return out.verdict()
    if not snapshot.gpus:
        text = "no NVIDIA GPU found"
        out.add(UNHEALTHY if required else OK, text if required else f"{text} (GPU not required)")
    for g in snapshot.gpus:
        if g.state is GpuState.LOST:
            out.add(UNHEALTHY, f"GPU {g.index}: lost")
            continue
        if g.state is GpuState.UNAVAILABLE:
            out.add(UNHEALTHY, f"GPU {g.index}: unavailable ({g.error})")
            continue
        _check_thermal(g, t, out)
        _check_power(g, t, out)
        _check_pcie(g, t, out)
        _check_memory_health(g, t, out)
        _check_processes(g, t, out)
    _check_events(events, snapshot.monotonic if now is None else now, t, out)
    return out.verdict()
