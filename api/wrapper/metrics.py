"""The wrapper's own Prometheus figures: how long each stage of a request took, what came of it,
and how uploads and webhooks fare.

The wrapper serves them at `GET /metrics` on its loopback port; the daemon's metrics listener
reads them at each scrape and appends them to its own (see `supervisor/reporting/metrics_server.py`), so
the operator scrapes one target per worker. Names do not overlap with the daemon's. Labels are
bounded: outcomes, stage names, results; never a request id.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from api.contract.result import FailureKind, JobStatus

# `_created` series double every counter for a figure no rule or panel here uses.
disable_created_metrics()

#: Stage durations: a queue wait can be long, inputs and outputs are usually short.
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
#: The stages of one request, in order (timings of the result: queue_ms, preprocess_ms, ...).
STAGES = {"queue": "queue_ms", "inputs": "preprocess_ms", "generation": "generation_ms",
          "outputs": "postprocess_ms"}


class WrapperMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter(
            "comfy_worker_jobs", "Requests the wrapper finished, by outcome: completed, "
            "cancelled, timeout, or the kind of failure (invalid, execution, comfyui_lost, "
            "restarted, internal).", ["outcome"], registry=r)
        self.stage = Histogram(
            "comfy_worker_stage_duration_seconds",
            "Seconds each stage of a finished request took: queue (waiting for ComfyUI), inputs "
            "(fetching and uploading input images), generation (ComfyUI running the prompt), "
            "outputs (collecting files and the S3 upload); upload is the S3 part of outputs "
            "alone, for requests that upload.", ["stage"],
            buckets=STAGE_BUCKETS, registry=r)
        self.sampling = Gauge("comfy_worker_last_sampling_iterations_per_second",
                              "Sampler it/s of the last request that reported progress.",
                              registry=r)
        self.uploads = Counter("comfy_worker_uploads", "Output files sent to S3, by result "
                               "(uploaded, failed).", ["result"], registry=r)
        self.webhooks = Counter(
            "comfy_worker_webhook_deliveries", "Webhook deliveries that settled, by result "
            "(delivered, failed, refused, expired, dropped: pushed out of a spool over "
            "webhook.spool_max_bytes).", ["result"], registry=r)
        self.spool = Gauge("comfy_worker_webhook_spool_deliveries",
                           "Webhook deliveries not settled yet (spooled on disk, being sent or "
                           "waiting to retry).", registry=r)
        self.queue = Gauge("comfy_worker_wrapper_queue_depth",
                           "Requests queued in the wrapper, not yet given to ComfyUI.",
                           registry=r)

        # Every label value from the start, at zero: a rule's ratio needs the series to exist.
        for status in JobStatus:
            if status.terminal and status is not JobStatus.FAILED:
                self.jobs.labels(status.value)
        for kind in FailureKind:
            self.jobs.labels(kind.value)
        for stage in (*STAGES, "upload"):
            self.stage.labels(stage)
        for result in ("uploaded", "failed"):
            self.uploads.labels(result)
        for result in ("delivered", "failed", "refused", "expired", "dropped"):
            self.webhooks.labels(result)

    def bind(self, *, spool: Callable[[], float], queue: Callable[[], float]) -> None:
        """Gauges read from their owners at scrape time."""
        self.spool.set_function(spool)
        self.queue.set_function(queue)

    def bind_model_cache(self, cache: Any) -> None:
        """The request-URL model cache's figures, read from it at scrape time."""
        class _CacheCollector:
            def describe(self) -> list:
                return []

            def collect(self):  # noqa: ANN202 - prometheus_client's collector protocol
                yield GaugeMetricFamily("comfy_worker_model_cache_bytes",
                                        "Bytes in the request-URL model cache.",
                                        value=cache.used_bytes)
                yield GaugeMetricFamily("comfy_worker_model_cache_limit_bytes",
                                        "The cache's cap (models.cache_max_gb).",
                                        value=cache.max_bytes)
                yield CounterMetricFamily("comfy_worker_model_cache_downloads",
                                          "Model URLs downloaded.", value=cache.downloads)
                yield CounterMetricFamily("comfy_worker_model_cache_evictions",
                                          "Cached models evicted.", value=cache.evictions)

        self.registry.register(_CacheCollector())

    def bind_retention(self, retention: Any) -> None:
        """What retention removed and the output folder's size (api.wrapper.retention.Retention),
        read from it at scrape time."""
        class _RetentionCollector:
            def describe(self) -> list:
                return []

            def collect(self):  # noqa: ANN202 - prometheus_client's collector protocol
                files = CounterMetricFamily(
                    "comfy_worker_retention_removed_files", "Files retention deleted, by kind "
                    "(outputs, inputs, temp).", labels=["kind"])
                sizes = CounterMetricFamily(
                    "comfy_worker_retention_removed_bytes", "Bytes retention freed, by kind "
                    "(a file's bytes count when its last link goes).", labels=["kind"])
                for kind, removed in retention.totals.items():
                    files.add_metric([kind], removed.files)
                    sizes.add_metric([kind], removed.bytes)
                yield files
                yield sizes
                last = retention.last
                if last is not None:
                    yield GaugeMetricFamily("comfy_worker_output_folder_bytes",
                                            "Bytes in ComfyUI's output folder at the last "
                                            "retention pass (each file once).",
                                            value=last.output_bytes)
                    yield GaugeMetricFamily("comfy_worker_output_folder_files",
                                            "Files in ComfyUI's output folder at the last "
                                            "retention pass (links included).",
                                            value=last.output_files)

        self.registry.register(_RetentionCollector())

    def job_finished(self, outcome: str, timings: dict[str, Any], started: bool) -> None:
        self.jobs.labels(outcome).inc()
        for stage, key in STAGES.items():
            if stage != "queue" and not started:
                continue  # it never left the queue: only its wait is a figure
            value = timings.get(key)
            if isinstance(value, (int, float)) and value >= 0:
                self.stage.labels(stage).observe(value / 1000.0)
        its = timings.get("sampling_its")
        if isinstance(its, (int, float)) and its > 0:
            self.sampling.set(its)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
