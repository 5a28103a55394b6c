"""The calibrated start-up benchmark.

Run the default SD1.5 graph through the wrapper (or ComfyUI directly), check every output,
compare the time per run with a reference for this GPU (or BENCHMARK_EXPECTED_SECONDS), name
the likely causes of a slow node from GPU telemetry, and cache the verdict until something
that matters changes.

    store = BenchmarkStore.for_state_dir(settings.worker.state_dir)
    report = await cached_benchmark(WrapperTarget(wrapper_url, comfy_url), settings,
                                    SamplerTelemetry(sampler), store=store)
    print(render_report(report)); state_reason = report.reason()
"""

from benchmark.cache import BenchmarkStore, CacheKey, CacheLookup
from benchmark.errors import (
    BenchmarkError,
    CheckpointMissing,
    OutputInvalid,
    ReferenceTableError,
    RunFailed,
)
from benchmark.graph import (
    build_graph,
    graph_fingerprint,
    load_prompts,
    workload_fingerprint,
)
from benchmark.models import (
    BenchmarkAction,
    BenchmarkParams,
    BenchmarkProgress,
    BenchmarkReport,
    BenchmarkStatus,
    Drift,
    Phase,
    RunRecord,
)
from benchmark.png import check_png
from benchmark.reference import Expectation, expectation, find_reference, load_reference
from benchmark.render import progress_bar, render_progress, render_report
from benchmark.runner import cached_benchmark, current_key, run_benchmark
from benchmark.targets import ComfyTarget, WrapperTarget
from benchmark.telemetry import (
    GpuInfo,
    NullTelemetry,
    SamplerTelemetry,
    TelemetrySource,
    TelemetrySummary,
)

__all__ = [
    "BenchmarkAction", "BenchmarkError", "BenchmarkParams", "BenchmarkProgress",
    "BenchmarkReport", "BenchmarkStatus", "BenchmarkStore", "CacheKey", "CacheLookup",
    "CheckpointMissing", "ComfyTarget", "Drift", "Expectation", "GpuInfo", "NullTelemetry",
    "OutputInvalid", "Phase", "ReferenceTableError", "RunFailed", "RunRecord",
    "SamplerTelemetry", "TelemetrySource", "TelemetrySummary", "WrapperTarget", "build_graph",
    "cached_benchmark", "check_png", "current_key", "expectation", "find_reference",
    "graph_fingerprint", "load_prompts", "load_reference", "progress_bar", "render_progress",
    "render_report", "run_benchmark", "workload_fingerprint",
]
