"""The worker's readings as Prometheus metric families, built at scrape time from plain records.

Each function here turns one part's state (a GPU snapshot, the children, a benchmark report) into
metric families; nothing here holds state or does I/O. `supervisor.reporting.metrics.WorkerMetrics` calls
them through the sources the daemon registers.

The GPU's own families are in `supervisor.gpu.families`. Per-instance series (a multi-GPU host runs one
ComfyUI and wrapper per GPU) carry `comfy_instance` (the instance number) and `gpu` (its GPU's
index, empty without one); the label is not `instance` because Prometheus gives that name to
the scrape target and would rename ours to `exported_instance`.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from supervisor.checks.provisioning import Totals
from supervisor.instances.instance import Instance


def info_family(version: str, comfyui_version: str, driver_version: str,
                cuda_version: str) -> Iterable[Metric]:
    family = GaugeMetricFamily(
        "comfy_worker_info", "Constant 1; the labels say what runs: the worker's version, "
        "ComfyUI's (empty until it answered once), the NVIDIA driver and CUDA versions.",
        labels=["version", "comfyui_version", "driver_version", "cuda_version"])
    family.add_metric([version, comfyui_version, driver_version, cuda_version], 1)
    yield family


# --- instances --------------------------------------------------------------------------------------
INSTANCE = ["comfy_instance", "gpu"]


def _who(instance: Instance) -> list[str]:
    gpu = instance.plan.gpu.index
    return [str(instance.number), "" if gpu is None else str(gpu)]


def child_families(instances: Iterable[Instance], states: Iterable[str]) -> Iterable[Metric]:
    """`instances`: objects with `number`, `plan.gpu.index`, and `comfyui` and `wrapper` children
    (each with `restarts` and `state`, a ChildState)."""
    states = list(states)
    restarts = CounterMetricFamily("comfy_worker_child_restarts",
                                   "Launches of each child after its first one (crashes, hangs, "
                                   "restarts asked for), since the daemon started.",
                                   labels=["child", *INSTANCE])
    ready = GaugeMetricFamily("comfy_worker_child_ready", "1 while the child is ready.",
                              labels=["child", *INSTANCE])
    state = GaugeMetricFamily("comfy_worker_child_state",
                              "1 for each child's current lifecycle state, 0 for the others.",
                              labels=["child", *INSTANCE, "state"])
    for instance in instances:
        who = _who(instance)
        for kind, child in (("comfyui", instance.comfyui), ("wrapper", instance.wrapper)):
            restarts.add_metric([kind, *who], child.restarts)
            ready.add_metric([kind, *who], 1 if child.state.value == "ready" else 0)
            for name in states:
                state.add_metric([kind, *who, name], 1 if child.state.value == name else 0)
    yield from (restarts, ready, state)


def instance_families(instances: Iterable[Instance], states: Iterable[str],
                      load: Callable[[int], int]) -> Iterable[Metric]:
    """Each instance's state, the requests handed to it (`load(number)`) and those it served."""
    states = list(states)
    state = GaugeMetricFamily("comfy_worker_instance_state",
                              "1 for each instance's current state, 0 for the others.",
                              labels=[*INSTANCE, "state"])
    serving = GaugeMetricFamily("comfy_worker_instance_serving",
                                "1 while the instance takes work.", labels=INSTANCE)
    in_flight = GaugeMetricFamily("comfy_worker_instance_requests_in_flight",
                                  "Requests handed to the instance's wrapper and not answered "
                                  "yet.", labels=INSTANCE)
    served = CounterMetricFamily("comfy_worker_instance_served",
                                 "Requests the instance answered with 200.", labels=INSTANCE)
    for instance in instances:
        who = _who(instance)
        for name in states:
            state.add_metric([*who, name], 1 if instance.state.value == name else 0)
        serving.add_metric(who, 1 if instance.state.serving else 0)
        in_flight.add_metric(who, load(instance.number))
        served.add_metric(who, instance.served)
    yield from (state, serving, in_flight, served)


# --- benchmark --------------------------------------------------------------------------------------
def benchmark_families(instances: Iterable[Instance], verdicts: Iterable[str]) -> Iterable[Metric]:
    """`instances`: with `benchmark`, a controller whose `report` is the last
    `benchmark.BenchmarkReport` (None before the first one)."""
    verdicts = list(verdicts)
    verdict = GaugeMetricFamily(
        "comfy_worker_benchmark_verdict",
        "1 for the last benchmark's verdict (pending: none yet), 0 for the others.",
        labels=[*INSTANCE, "verdict"])
    running = GaugeMetricFamily("comfy_worker_benchmark_pending",
                                "1 while a benchmark is due or running (the instance waits).",
                                labels=INSTANCE)
    figures: dict[str, GaugeMetricFamily] = {}
    for instance in instances:
        bench = instance.benchmark
        if bench is None:
            continue
        who = _who(instance)
        report = bench.report
        current = bench.status()
        for name in (*verdicts, "pending"):
            verdict.add_metric([*who, name], 1 if name == current else 0)
        running.add_metric(who, 1 if bench.pending else 0)
        if report is None:
            continue
        drift = report.drift
        sibling = bench.siblings
        for name, doc, value in (
            ("comfy_worker_benchmark_seconds", "Median seconds per measured benchmark run.",
             report.seconds),
            ("comfy_worker_benchmark_expected_seconds",
             "Seconds per run a healthy node of this GPU takes (setting or reference table).",
             report.expected_seconds),
            ("comfy_worker_benchmark_time_ratio",
             "Measured over expected seconds per run (1.25 = 25% slower than expected).",
             report.ratio),
            ("comfy_worker_benchmark_iterations_per_second",
             "Median sampler it/s of the benchmark.", report.its),
            ("comfy_worker_benchmark_expected_iterations_per_second",
             "The it/s a run at the expected seconds would show (measured it/s x time ratio).",
             report.its * report.ratio if report.its and report.ratio else None),
            ("comfy_worker_benchmark_sibling_ratio",
             "Time per sampler step over the median of the sibling GPUs of the same model on "
             "the host (1.3 = 30% slower).", sibling.ratio if sibling else None),
            ("comfy_worker_benchmark_drift_ratio",
             "Seconds per run over this node's own median of earlier runs (1 = no drift).",
             drift.ratio),
            ("comfy_worker_benchmark_drift_flagged",
             "1 when the last run drifted more than 20% from this node's own history.",
             1 if drift.flagged else 0),
            ("comfy_worker_benchmark_requests_per_second",
             "Requests per second the benchmark measured (the autoscaler's max_perf).",
             report.max_perf),
            ("comfy_worker_benchmark_timestamp_seconds",
             "When the last benchmark finished (Unix).", report.timestamp),
        ):
            if value is None:
                continue
            family = figures.get(name)
            if family is None:
                family = figures[name] = GaugeMetricFamily(name, doc, labels=INSTANCE)
            family.add_metric(who, float(value))
    yield verdict
    yield running
    yield from figures.values()


# --- models -----------------------------------------------------------------------------------------
def model_families(totals: Totals, missing: int) -> Iterable[Metric]:
    """`totals`: `supervisor.checks.provisioning.Totals` of the manifest's files."""
    yield GaugeMetricFamily("comfy_worker_models_downloaded_bytes",
                            "Bytes of the manifest's model files in place or received so far.",
                            value=totals.done_bytes)
    yield GaugeMetricFamily("comfy_worker_models_size_bytes",
                            "Bytes of the manifest's model files, as their sources announce.",
                            value=totals.total_bytes)
    yield GaugeMetricFamily("comfy_worker_models_missing",
                            "Manifest model files not in place yet.", value=missing)
    yield CounterMetricFamily("comfy_worker_model_download_failures",
                              "Manifest downloads that failed after the engine's retries.",
                              value=totals.failures)
