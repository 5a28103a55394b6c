"""Prometheus metrics of the worker, in a registry of its own (nothing global leaks in).

Two kinds live here. Figures the request path changes as it goes (requests by status, their
duration, the queue) are prometheus_client instruments updated in place. Everything that is a
reading of some part's state (worker and child states, restarts, the benchmark, the GPUs) is built
at scrape time from that part by a *source*: a function that yields metric families. So a series
can never go stale behind the thing it describes, and the parts do not know about Prometheus.

Names follow Prometheus' conventions: base units in the name (`_seconds`, `_bytes`, `_watts`,
`_celsius`, `_hertz`, `_joules`, `_ratio`), `_total` for counters, `_info` for a constant 1 that
carries labels. Labels have bounded values (states, child names, GPU indexes, XID codes, HTTP
statuses); nothing per request. The metric names are part of the operator's contract: the alert
rules (`misc/prometheus/`) and the dashboard (`misc/grafana/`) use them, and a test scrapes a real
worker with a real Prometheus and evaluates every one of their queries.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import Metric

from supervisor.state import WorkerState

logger = logging.getLogger(__name__)

#: Request durations at the public port, from a tiny workflow to a long video job.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

# `_created` series double every counter for a figure no rule or panel here uses.
disable_created_metrics()

Source = Callable[[], Iterable[Metric]]


class _Sources:
    """A prometheus_client collector that asks each source at scrape time."""

    def __init__(self) -> None:
        self.sources: list[Source] = []

    def describe(self) -> list[Metric]:
        return []  # built at scrape time; no up-front description

    def collect(self) -> Iterable[Metric]:
        for source in self.sources:
            try:
                yield from source()
            except Exception:  # one broken part must not take the whole scrape down
                logger.exception("metrics source %s failed", getattr(source, "__name__", source))


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.state = Gauge("comfy_worker_state",
                           "1 for the worker's current state, 0 for the others.", ["state"],
                           registry=r)
        self.queue_depth = Gauge("comfy_worker_queue_depth",
                                 "Requests waiting at the public port for a slot.", registry=r)
        self.queue_capacity = Gauge("comfy_worker_queue_capacity",
                                    "Requests that may wait before new ones get 503 "
                                    "(worker.queue_size).", registry=r)
        self.in_flight = Gauge("comfy_worker_requests_in_flight",
                               "Requests handed to the wrapper and not answered yet.", registry=r)
        self.requests = Counter("comfy_worker_requests", "Requests answered at the public port, "
                                "by HTTP status.", ["status"], registry=r)
        self.duration = Histogram(
            "comfy_worker_request_duration_seconds",
            "Time from arrival at the public port to the answer, queueing included.",
            buckets=DURATION_BUCKETS, registry=r)
        self.wrapper_metrics_up = Gauge(
            "comfy_worker_wrapper_metrics_up",
            "1 when the wrapper's own figures were read for this scrape (they follow below).",
            registry=r)
        for status in ("200", "400", "422", "499", "500", "502", "503", "504"):
            self.requests.labels(status)  # zero from the start: ratios and rules see them
        self._sources = _Sources()
        r.register(self._sources)

    def add_source(self, source: Source) -> None:
        """Register a function that yields metric families at each scrape."""
        self._sources.sources.append(source)

    def set_state(self, state: WorkerState) -> None:
        for candidate in WorkerState:
            self.state.labels(candidate.value).set(1 if candidate is state else 0)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
