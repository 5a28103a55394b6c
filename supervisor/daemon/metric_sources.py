"""What /metrics reads at each scrape: each part is asked then, nothing is copied ahead."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Iterable

from prometheus_client.core import Metric

from benchmark import BenchmarkStatus
from supervisor.checks.disk import DiskGuard
from supervisor.checks.provisioning import Provisioner
from supervisor.children.child import ChildState
from supervisor.daemon.fleet import Fleet
from supervisor.gpu.monitor import GpuMonitor
from supervisor.reporting.families import (
    benchmark_families,
    child_families,
    info_family,
    instance_families,
    model_families,
)
from supervisor.reporting.metrics import WorkerMetrics
from supervisor.state import WorkerState


def package_version() -> str:
    try:
        return version("comfy-worker")
    except PackageNotFoundError:
        return "unknown"


def register_metric_sources(metrics: WorkerMetrics, fleet: Fleet, *, queue_size: int,
                            gpu: GpuMonitor | None = None,
                            provisioner: Provisioner | None = None,
                            disk: DiskGuard | None = None) -> None:
    states = [state.value for state in ChildState]
    verdicts = [status.value for status in BenchmarkStatus]
    instances = fleet.instances

    def info() -> Iterable[Metric]:
        latest = gpu.latest() if gpu else None
        first = fleet.first
        return info_family(package_version(), first.comfyui_version if first else "",
                           (latest.driver_version if latest else None) or "",
                           (latest.cuda_version if latest else None) or "")

    metrics.add_source(info)
    metrics.add_source(lambda: child_families(instances, states))
    metrics.add_source(lambda: instance_families(
        instances, [state.value for state in WorkerState], fleet.router.load))
    if fleet.benchmark is not None:
        metrics.add_source(lambda: benchmark_families(instances, verdicts))
    if gpu is not None:
        metrics.add_source(gpu.metric_families)
    if provisioner is not None:
        metrics.add_source(lambda: model_families(provisioner.totals(), provisioner.missing()))
    if disk is not None:
        metrics.add_source(disk.metric_families)
    metrics.queue_capacity.set(queue_size)
