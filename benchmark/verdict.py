"""Turning measurements into a verdict: pass or slow, why, and drift from the node's history.

Pure functions over plain records; nothing here talks to ComfyUI or reads files.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Sequence

from benchmark.models import BenchmarkReport, BenchmarkStatus, Drift
from benchmark.reference import Expectation, expectation
from benchmark.telemetry import (
    POWER_REASONS,
    THERMAL_REASONS,
    GpuInfo,
    TelemetrySummary,
    reason_label,
)

DRIFT_THRESHOLD = 0.20  # more than 20% off the node's own median is drift
DRIFT_MIN_HISTORY = 2  # earlier runs needed before drift is judged


@dataclass(frozen=True)
class DiagnosisThresholds:
    clock_ratio: float = 0.80  # mean SM clock under this share of its maximum is a cause
    power_limit_ratio: float = 0.95  # enforced power limit under this share of the default
    throttle_share: float = 0.10  # NVML throttle counters grew by this share of the run time


def decide(seconds: float | None, expected: Expectation, slow_threshold: float
           ) -> tuple[BenchmarkStatus, float | None]:
    """pass / slow / no_reference, and seconds ÷ expected."""
    if seconds is None:
        return BenchmarkStatus.ERROR, None
    if expected.seconds is None or expected.seconds <= 0:
        return BenchmarkStatus.NO_REFERENCE, None
    ratio = seconds / expected.seconds
    slow = seconds > expected.seconds * (1.0 + slow_threshold)
    return (BenchmarkStatus.SLOW if slow else BenchmarkStatus.PASS), ratio


def diagnose(*, gpu: GpuInfo | None, telemetry: TelemetrySummary | None,
             device_type: str | None = None, gpu_busy: bool = True,
             throttle_before: GpuInfo | None = None, measured_seconds: float = 0.0,
             thresholds: DiagnosisThresholds = DiagnosisThresholds()) -> list[str]:
    """Everything found that can make a GPU slow, one human sentence each.

    ``gpu`` is the GPU as read during (``gpu_busy``) or right after the measured runs; the PCIe
    generation is only judged from a reading taken while busy, because an idle link steps down
    to save power. ``throttle_before`` is the reading before the runs, for NVML's accumulated
    throttle counters; ``measured_seconds`` the time those runs took.
    """
    causes: list[str] = []
    if device_type and device_type.lower() == "cpu":
        causes.append("ComfyUI runs on the CPU (its system_stats reports device type cpu); "
                      "check for --cpu in its command and that PyTorch sees the GPU")
    if telemetry is not None:
        thermal = [r for r in telemetry.reasons_seen if r in THERMAL_REASONS]
        power = [r for r in telemetry.reasons_seen if r in POWER_REASONS]
        if thermal:
            text = ", ".join(reason_label(r) for r in thermal) + " during the run"
            if telemetry.peak_temperature_c is not None:
                text += f" (peak {telemetry.peak_temperature_c:.0f} °C)"
            causes.append(text)
        if power:
            text = ", ".join(reason_label(r) for r in power) + " during the run"
            if telemetry.mean_power_w is not None:
                text += f" (mean {telemetry.mean_power_w:.0f} W)"
            causes.append(text)
    if gpu is not None and throttle_before is not None and measured_seconds > 0:
        for label, before, after in (
            ("thermal", throttle_before.thermal_throttle_s, gpu.thermal_throttle_s),
            ("power", throttle_before.power_throttle_s, gpu.power_throttle_s),
        ):
            if before is None or after is None:
                continue
            grown = after - before
            if grown > thresholds.throttle_share * measured_seconds:
                causes.append(f"NVML counted {grown:.1f} s of {label} throttling during "
                              f"{measured_seconds:.1f} s of runs")
    if gpu is None:
        return causes
    if (gpu.enforced_power_limit_w is not None and gpu.default_power_limit_w
            and gpu.enforced_power_limit_w < thresholds.power_limit_ratio * gpu.default_power_limit_w):
        causes.append(f"power limit set to {gpu.enforced_power_limit_w:.0f} W, below the "
                      f"default {gpu.default_power_limit_w:.0f} W")
    if (telemetry is not None and telemetry.samples and telemetry.mean_sm_clock_mhz is not None
            and gpu.sm_max_mhz and telemetry.mean_sm_clock_mhz < thresholds.clock_ratio * gpu.sm_max_mhz):
        share = telemetry.mean_sm_clock_mhz / gpu.sm_max_mhz
        causes.append(f"mean SM clock {telemetry.mean_sm_clock_mhz:.0f} MHz, {share:.0%} of its "
                      f"{gpu.sm_max_mhz:.0f} MHz maximum")
    link = _pcie_cause(gpu, gpu_busy)
    if link:
        causes.append(link)
    foreign = [p for p in gpu.processes or () if p.ours is False]
    if foreign:
        shown = ", ".join(f"pid {p.pid}" + (f" using {p.used_mib:.0f} MiB" if p.used_mib else "")
                          for p in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        causes.append(f"{len(foreign)} other process(es) on the GPU ({shown}{more})")
    return causes


def _pcie_cause(gpu: GpuInfo, busy: bool) -> str | None:
    gen_low = (busy and gpu.pcie_gen is not None and gpu.pcie_max_gen is not None
               and gpu.pcie_gen < gpu.pcie_max_gen)
    width_low = (gpu.pcie_width is not None and gpu.pcie_max_width is not None
                 and gpu.pcie_width < gpu.pcie_max_width)
    if not (gen_low or width_low):
        return None
    now = f"Gen{gpu.pcie_gen or '?'} x{gpu.pcie_width or '?'}"
    best = f"Gen{gpu.pcie_max_gen or '?'} x{gpu.pcie_max_width or '?'}"
    return f"PCIe link at {now}, below its {best} maximum"


def drift(seconds: float | None, history: Sequence[float], *, threshold: float = DRIFT_THRESHOLD,
          min_history: int = DRIFT_MIN_HISTORY) -> Drift:
    """Compare ``seconds`` with the median of this node's earlier runs of the same workload."""
    usable = [h for h in history if h and h > 0]
    if seconds is None or len(usable) < min_history:
        return Drift(history_runs=len(usable))
    median = statistics.median(usable)
    ratio = seconds / median
    off = ratio - 1.0
    flagged = abs(off) > threshold
    direction = "slower" if off > 0 else "faster"
    text = (f"{abs(off):.0%} {direction} than this node's median of {len(usable)} earlier "
            f"run(s) ({median:.2f} s)")
    return Drift(flagged=flagged, text=text, history_median=median, history_runs=len(usable),
                 ratio=ratio)


def rejudge(report: BenchmarkReport, *, expected_seconds: float, slow_threshold: float,
            action: object) -> BenchmarkReport:
    """The same measurement judged with the current settings (a cache hit after the operator
    changed BENCHMARK_EXPECTED_SECONDS, the threshold or the action)."""
    if report.status is BenchmarkStatus.ERROR or report.seconds is None:
        return dataclasses.replace(report, action=action)
    params = report.params
    expected = expectation(report.gpu_name, width=params.width, height=params.height,
                           steps=params.steps, override_seconds=expected_seconds)
    status, ratio = decide(report.seconds, expected, slow_threshold)
    new_params = dataclasses.replace(params, expected_seconds=expected_seconds,
                                     slow_threshold=slow_threshold, action=action)
    return dataclasses.replace(
        report, status=status, ratio=ratio, expected_seconds=expected.seconds,
        expected_source=expected.source, expected_note=expected.note, action=action,
        params=new_params)
