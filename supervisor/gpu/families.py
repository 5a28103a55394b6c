"""The GPU readings as Prometheus metric families, built at scrape time from plain records.

Per-GPU series carry only `gpu` (the NVML index): the name and UUID are in `comfy_worker_gpu_info`
and joined in a query when wanted (`* on(instance, gpu) group_left(name) comfy_worker_gpu_info`),
so a label never changes under a running series. Units are converted here where NVML's are not
base units: MHz to hertz, MiB to bytes, percent to a 0..1 ratio, mJ to joules.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from supervisor.gpu.model import ClockEventReason, GpuRecord, GpuSnapshot

_MHZ = 1e6
_MIB = 1048576
GPU = ["gpu"]


class _GpuFamilies:
    """Collects one family per name while walking the GPUs; only families with samples remain."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}

    def gauge(self, name: str, doc: str, labels: list[str], values: list[str],
              value: float | None, scale: float = 1.0) -> None:
        if value is None:
            return
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = GaugeMetricFamily(name, doc, labels=labels)
        family.add_metric(values, float(value) * scale)

    def counter(self, name: str, doc: str, labels: list[str], values: list[str],
                value: float | None, scale: float = 1.0) -> None:
        if value is None:
            return
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = CounterMetricFamily(name, doc, labels=labels)
        family.add_metric(values, float(value) * scale)


def _bool(value: bool | None) -> float | None:
    return None if value is None else (1.0 if value else 0.0)


def _record(f: _GpuFamilies, gpu: GpuRecord) -> None:
    i = [str(gpu.index)]
    f.gauge("comfy_worker_gpu_up", "1 while the GPU can be read, 0 when it is lost or "
            "unavailable.", GPU, i, 1 if gpu.available else 0)
    if not gpu.available:
        return
    f.gauge("comfy_worker_gpu_info", "Constant 1 per GPU; the labels give its name and UUID.",
            ["gpu", "name", "uuid"], [str(gpu.index), gpu.name or "", gpu.uuid or ""], 1)
    t, p, c, u, m = gpu.temperature, gpu.power, gpu.clocks, gpu.utilization, gpu.memory
    f.gauge("comfy_worker_gpu_temperature_celsius", "GPU core temperature.", GPU, i, t.current_c)
    f.gauge("comfy_worker_gpu_slowdown_temperature_celsius",
            "Temperature at which the GPU starts slowing its clocks.", GPU, i, t.slowdown_c)
    f.gauge("comfy_worker_gpu_shutdown_temperature_celsius",
            "Temperature at which the GPU turns itself off.", GPU, i, t.shutdown_c)
    f.gauge("comfy_worker_gpu_power_watts", "GPU power draw.", GPU, i, p.draw_w)
    f.gauge("comfy_worker_gpu_power_limit_watts", "Power limit the GPU enforces now.", GPU, i,
            p.enforced_limit_w)
    f.gauge("comfy_worker_gpu_power_default_limit_watts", "The board's default power limit.",
            GPU, i, p.default_limit_w)
    f.counter("comfy_worker_gpu_energy_joules", "Energy the GPU used since the driver loaded.",
              GPU, i, p.energy_mj, 1e-3)
    f.gauge("comfy_worker_gpu_sm_clock_hertz", "SM clock.", GPU, i, c.sm_mhz, _MHZ)
    f.gauge("comfy_worker_gpu_sm_clock_max_hertz", "Highest SM clock of the board.", GPU, i,
            c.sm_max_mhz, _MHZ)
    f.gauge("comfy_worker_gpu_memory_clock_hertz", "Memory clock.", GPU, i, c.mem_mhz, _MHZ)
    f.gauge("comfy_worker_gpu_memory_clock_max_hertz", "Highest memory clock of the board.",
            GPU, i, c.mem_max_mhz, _MHZ)
    if c.event_reasons is not None:
        active = set(c.event_reasons)
        for reason in ClockEventReason:
            f.gauge("comfy_worker_gpu_clock_event_active",
                    "1 while this reason holds the clocks below their maximum (NVML clock "
                    "event / throttle reasons).", ["gpu", "reason"], [str(gpu.index),
                                                                      reason.value],
                    1 if reason in active else 0)
    for cause, seconds in (("power", c.power_throttle_s), ("thermal", c.thermal_throttle_s)):
        f.counter("comfy_worker_gpu_throttle_seconds",
                  "Time the GPU was held back, by cause, as NVML accumulates it.",
                  ["gpu", "cause"], [str(gpu.index), cause], seconds)
    f.gauge("comfy_worker_gpu_utilization_ratio", "Share of time a kernel ran (0..1).", GPU, i,
            u.gpu_pct, 0.01)
    f.gauge("comfy_worker_gpu_memory_utilization_ratio",
            "Share of time GPU memory was read or written (0..1).", GPU, i, u.memory_pct, 0.01)
    f.gauge("comfy_worker_gpu_memory_used_bytes", "GPU memory in use.", GPU, i, m.used_mib, _MIB)
    f.gauge("comfy_worker_gpu_memory_total_bytes", "GPU memory in all.", GPU, i, m.total_mib,
            _MIB)
    e = gpu.ecc
    f.gauge("comfy_worker_gpu_ecc_enabled", "1 when ECC is on (absent: the board has none).",
            GPU, i, _bool(e.enabled))
    for kind, volatile, aggregate in (("corrected", e.volatile_corrected, e.aggregate_corrected),
                                      ("uncorrected", e.volatile_uncorrected,
                                       e.aggregate_uncorrected)):
        f.counter("comfy_worker_gpu_ecc_errors", "ECC errors since the driver loaded.",
                  ["gpu", "type"], [str(gpu.index), kind], volatile)
        f.gauge("comfy_worker_gpu_ecc_lifetime_errors", "ECC errors over the board's life.",
                ["gpu", "type"], [str(gpu.index), kind], aggregate)
    rows = gpu.remapped_rows
    for kind, value in (("corrected", rows.corrected), ("uncorrected", rows.uncorrected)):
        f.gauge("comfy_worker_gpu_remapped_rows", "Memory rows remapped, by the error that "
                "caused it (Ampere and newer).", ["gpu", "type"], [str(gpu.index), kind], value)
    f.gauge("comfy_worker_gpu_row_remap_pending", "1 when a row remap waits for a GPU reset.",
            GPU, i, _bool(rows.pending))
    f.gauge("comfy_worker_gpu_row_remap_failed",
            "1 when a row remap failed: the board needs service.", GPU, i, _bool(rows.failure))
    pages = gpu.retired_pages
    for cause, value in (("single_bit", pages.single_bit), ("double_bit", pages.double_bit)):
        f.gauge("comfy_worker_gpu_retired_pages", "Memory pages retired (before Ampere).",
                ["gpu", "cause"], [str(gpu.index), cause], value)
    f.gauge("comfy_worker_gpu_retired_pages_pending",
            "1 when a page retirement waits for a driver reload.", GPU, i, _bool(pages.pending))
    link = gpu.pcie
    f.gauge("comfy_worker_gpu_pcie_link_generation", "PCIe link generation now.", GPU, i,
            link.gen)
    f.gauge("comfy_worker_gpu_pcie_link_generation_max",
            "Best PCIe generation the GPU and its slot support.", GPU, i, link.max_gen)
    f.gauge("comfy_worker_gpu_pcie_link_width", "PCIe lanes now.", GPU, i, link.width)
    f.gauge("comfy_worker_gpu_pcie_link_width_max", "Most PCIe lanes the link supports.", GPU,
            i, link.max_width)
    f.counter("comfy_worker_gpu_pcie_replays", "PCIe replays (link-level retransmissions).",
              GPU, i, link.replay_counter)
    if gpu.processes is not None:
        f.gauge("comfy_worker_gpu_foreign_processes",
                "Compute processes on the GPU that are not ComfyUI's.", GPU, i,
                len(gpu.foreign_processes))


def gpu_families(snapshot: GpuSnapshot | None, health_level: int,
                 xid_counts: Mapping[tuple[str, str, str], int],
                 ecc_event_counts: Mapping[str, int]) -> Iterable[Metric]:
    """The GPU readings. `xid_counts`: (gpu, xid, severity) -> events since the daemon started;
    `ecc_event_counts`: gpu -> double-bit ECC events."""
    yield GaugeMetricFamily("comfy_worker_gpu_health",
                            "The GPU policy's verdict: 0 ok, 1 degraded, 2 unhealthy.",
                            value=health_level)
    xids = CounterMetricFamily("comfy_worker_gpu_xid_errors",
                               "XID errors NVML reported, by code and the severity that "
                               "config/xid_codes.toml gives it.", labels=["gpu", "xid",
                                                                          "severity"])
    for labels, count in sorted(xid_counts.items()):
        xids.add_metric(list(labels), count)
    yield xids
    ecc = CounterMetricFamily("comfy_worker_gpu_double_bit_ecc_events",
                              "Double-bit ECC error events NVML reported.", labels=GPU)
    for gpu, count in sorted(ecc_event_counts.items()):
        ecc.add_metric([gpu], count)
    yield ecc
    if snapshot is None:
        return
    yield GaugeMetricFamily("comfy_worker_nvml_up", "1 when NVML could be used at all.",
                            value=1 if snapshot.status.available else 0)
    families = _GpuFamilies()
    for gpu in snapshot.gpus:
        _record(families, gpu)
    yield from families.families.values()
