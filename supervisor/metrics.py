"""Prometheus metrics of the worker, in a registry of its own (nothing global leaks in)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from supervisor.state import WorkerState


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.state = Gauge("comfy_worker_state", "1 for the worker's current state.", ["state"],
                           registry=r)
        self.child_restarts = Gauge("comfy_worker_child_restarts",
                                    "Restarts of each child since the daemon started.", ["child"],
                                    registry=r)
        self.child_up = Gauge("comfy_worker_child_ready", "1 while the child is ready.", ["child"],
                              registry=r)
        self.queue_depth = Gauge("comfy_worker_queue_depth",
                                 "Requests waiting for ComfyUI at the public port.", registry=r)
        self.in_flight = Gauge("comfy_worker_requests_in_flight",
                               "Requests being generated right now.", registry=r)
        self.requests = Counter("comfy_worker_requests", "Requests answered, by HTTP status.",
                                ["status"], registry=r)
        self.duration = Histogram(
            "comfy_worker_request_duration_seconds", "Time from arrival to answer.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
            registry=r)
        self.bench_seconds = Gauge("comfy_worker_benchmark_seconds",
                                   "Median seconds per benchmark run.", registry=r)
        self.bench_its = Gauge("comfy_worker_benchmark_its", "Benchmark sampling it/s.",
                               registry=r)
        self.bench_expected = Gauge("comfy_worker_benchmark_expected_seconds",
                                    "Expected seconds per benchmark run (0: no reference).",
                                    registry=r)
        self.bench_slow = Gauge("comfy_worker_benchmark_slow",
                                "1 when the last benchmark judged the node slow.", registry=r)
        self.max_perf = Gauge("comfy_worker_max_perf_rps",
                              "Requests per second the benchmark measured.", registry=r)
        gpu = ["gpu", "name"]
        self.gpu_temp = Gauge("comfy_worker_gpu_temperature_celsius", "GPU temperature.", gpu,
                              registry=r)
        self.gpu_power = Gauge("comfy_worker_gpu_power_watts", "GPU power draw.", gpu, registry=r)
        self.gpu_power_limit = Gauge("comfy_worker_gpu_power_limit_watts",
                                     "Enforced GPU power limit.", gpu, registry=r)
        self.gpu_sm_clock = Gauge("comfy_worker_gpu_sm_clock_mhz", "SM clock.", gpu, registry=r)
        self.gpu_util = Gauge("comfy_worker_gpu_utilization_percent", "GPU utilisation.", gpu,
                              registry=r)
        self.gpu_mem_used = Gauge("comfy_worker_gpu_memory_used_bytes", "GPU memory used.", gpu,
                                  registry=r)
        self.gpu_throttled = Gauge("comfy_worker_gpu_throttled",
                                   "1 while a HW/thermal/power slowdown is active.", gpu,
                                   registry=r)
        self.gpu_health = Gauge("comfy_worker_gpu_health",
                                "0 ok, 1 degraded, 2 unhealthy.", registry=r)

    def set_state(self, state: WorkerState) -> None:
        for candidate in WorkerState:
            self.state.labels(candidate.value).set(1 if candidate is state else 0)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
