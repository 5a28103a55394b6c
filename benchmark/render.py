"""Text for people: the report as a table, and a one-line progress bar.

Data stays in :mod:`benchmark.models`; JSON output is ``report.to_dict()``.
"""

from __future__ import annotations

import datetime as _dt

from benchmark.models import BenchmarkProgress, BenchmarkReport, Phase, RunRecord
from benchmark.telemetry import TelemetrySummary


def progress_bar(step: int, total: int, *, width: int = 20, its: float | None = None,
                 unit: str = "steps") -> str:
    """``[#####.....] 10/20 steps 4.1 it/s`` (print it with ``\\r`` to redraw in place)."""
    total = max(0, int(total))
    step = min(max(0, int(step)), total) if total else max(0, int(step))
    filled = int(width * step / total) if total else 0
    bar = "#" * filled + "." * (width - filled)
    text = f"[{bar}] {step}/{total or '?'} {unit}"
    if its:
        text += f" {its:.1f} it/s"
    return text


def render_progress(progress: BenchmarkProgress, *, width: int = 20) -> str:
    """One line for ``on_progress``: ``warm-up (loads the model) [####......] 8/20 steps 3.9 it/s``."""
    if progress.phase in (Phase.CHECKING, Phase.DONE):
        return progress.message
    bar = progress_bar(progress.step, progress.steps, width=width, its=progress.its)
    return f"{progress.message} {bar}".strip()


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f} s"


def _telemetry_text(t: TelemetrySummary | None) -> str:
    if t is None:
        return "none (no GPU telemetry)"
    parts = [f"{t.samples} sample(s)"]
    if t.mean_temperature_c is not None:
        peak = f" / peak {t.peak_temperature_c:.0f}" if t.peak_temperature_c is not None else ""
        parts.append(f"temp {t.mean_temperature_c:.0f}{peak} °C")
    if t.mean_power_w is not None:
        parts.append(f"power {t.mean_power_w:.0f} W")
    if t.mean_sm_clock_mhz is not None:
        parts.append(f"SM {t.mean_sm_clock_mhz:.0f} MHz")
    if t.mean_utilization_pct is not None:
        parts.append(f"util {t.mean_utilization_pct:.0f}%")
    if t.energy_j is not None:
        parts.append(f"energy {t.energy_j:.0f} J")
    if t.reasons_seen:
        parts.append("clock reasons: " + ", ".join(t.reason_labels))
    return ", ".join(parts)


def render_report(report: BenchmarkReport) -> str:
    """A two-column summary, the causes, and a table of the runs."""
    p = report.params
    rows: list[tuple[str, str]] = []
    verdict = report.status.value + (" (cached)" if report.from_cache else "")
    rows.append(("Verdict", f"{verdict}   action if slow: {report.action.value}"))
    rows.append(("Reason", report.reason()))
    gpu = report.gpu
    if gpu is not None:
        driver = f"driver {gpu.driver_version}" if gpu.driver_version else ""
        detail = ", ".join(x for x in (gpu.uuid, driver) if x)
        rows.append(("GPU", f"{gpu.name or '?'}" + (f" ({detail})" if detail else "")))
    else:
        rows.append(("GPU", "not read (no GPU telemetry)"))
    comfy = report.comfyui_version or "?"
    if report.comfyui_device:
        comfy += f" on {report.comfyui_device}"
    rows.append(("ComfyUI", comfy))
    rows.append(("Target", report.target or "-"))
    rows.append(("Workload", f"{p.width}x{p.height}, {p.steps} steps, {p.checkpoint}, "
                             f"warm-up + {p.runs} run(s)"))
    if report.error is None:
        rows.append(("Seconds per run", f"{_s(report.seconds)} (median)"))
        rows.append(("Sampler", f"{report.its:.2f} it/s" if report.its else "-"))
        expected = _s(report.expected_seconds)
        if report.expected_note:
            expected += f" ({report.expected_note})"
        if report.ratio is not None:
            expected += f", measured/expected {report.ratio:.2f}"
        rows.append(("Expected", expected))
        rows.append(("Warm-up (model load)", _s(report.load_seconds)))
        rows.append(("Max perf", f"{report.max_perf:.3f} requests/s" if report.max_perf else "-"))
        rows.append(("Drift", report.drift.text or
                     f"not judged ({report.drift.history_runs} earlier run(s) in the history)"))
        rows.append(("Telemetry", _telemetry_text(report.telemetry)))
    else:
        rows.append(("Error", report.error))
    when = _dt.datetime.fromtimestamp(report.timestamp).strftime("%Y-%m-%d %H:%M:%S")
    rows.append(("Measured", f"{when}, took {report.duration_s:.1f} s"))

    label_width = max(len(label) for label, _ in rows)
    lines = [f"{label.ljust(label_width)}  {value}" for label, value in rows]
    if report.causes:
        lines.append("Causes found:")
        lines.extend(f"  - {cause}" for cause in report.causes)
    if report.runs:
        lines.append("")
        lines.extend(_runs_table(report.runs))
    return "\n".join(lines)


def _runs_table(runs: list[RunRecord]) -> list[str]:
    header = ("Run", "Seconds", "it/s", "Steps", "Temp °C", "Power W", "Clock reasons")
    body = []
    for run in runs:
        t = run.telemetry
        body.append((
            "warm-up" if run.warmup else str(run.run),
            f"{run.seconds:.2f}",
            f"{run.its:.2f}" if run.its else "-",
            str(run.steps),
            f"{t.mean_temperature_c:.0f}" if t and t.mean_temperature_c is not None else "-",
            f"{t.mean_power_w:.0f}" if t and t.mean_power_w is not None else "-",
            ", ".join(t.reason_labels) if t and t.reasons_seen else "-",
        ))
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    fmt = lambda row: "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()  # noqa: E731
    return [fmt(header), fmt(tuple("-" * w for w in widths)), *(fmt(row) for row in body)]
