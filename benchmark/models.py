"""Typed records of a benchmark: its parameters, its runs, its progress and its report.

A :class:`BenchmarkReport` is the one object the daemon, the admin socket and the CLI share:
``to_dict()`` is its JSON form (also what the cache and history store), ``reason()`` the one
line for the worker state, and ``benchmark.render.render_report`` its table.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.telemetry import GpuInfo, TelemetrySummary


class BenchmarkStatus(str, enum.Enum):
    PASS = "pass"  # as fast as expected
    SLOW = "slow"  # slower than expected × (1 + slow_threshold)
    NO_REFERENCE = "no_reference"  # measured, but nothing to compare with
    ERROR = "error"  # no measurement: the checkpoint is missing, a run failed...


class BenchmarkAction(str, enum.Enum):
    """What the operator wants done with a slow node (the daemon applies it)."""

    REFUSE = "refuse"  # unhealthy: take no work
    REPORT = "report"  # degraded: take work, say so


class Phase(str, enum.Enum):
    CHECKING = "checking"  # ComfyUI reachable, checkpoint installed
    WARMUP = "warmup"  # first run: loads the model
    RUN = "run"  # a measured run
    DONE = "done"


@dataclass(frozen=True)
class BenchmarkParams:
    """The ``[benchmark]`` settings a run uses (a copy, so a report says what it was run with)."""

    width: int = 512
    height: int = 512
    steps: int = 20
    checkpoint: str = "v1-5-pruned-emaonly.safetensors"
    runs: int = 2
    expected_seconds: float = 0.0  # 0: use the reference table
    slow_threshold: float = 0.20
    action: BenchmarkAction = BenchmarkAction.REFUSE
    cache_max_age: float = 7 * 86400.0
    run_timeout: float = 1200.0
    prompts_file: str | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> "BenchmarkParams":
        """From ``config.Settings`` (``settings.benchmark.*``)."""
        b = settings.benchmark
        prompts = b.prompts_file
        return cls(width=int(b.width), height=int(b.height), steps=int(b.steps),
                   checkpoint=str(b.checkpoint), runs=int(b.runs),
                   expected_seconds=float(b.expected_seconds),
                   slow_threshold=float(b.slow_threshold), action=BenchmarkAction(b.action),
                   cache_max_age=float(b.cache_max_age), run_timeout=float(b.run_timeout),
                   prompts_file=str(prompts) if prompts else None)

    @property
    def prompts_path(self) -> Path | None:
        return Path(self.prompts_file) if self.prompts_file else None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["action"] = self.action.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchmarkParams":
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        if "action" in values:
            values["action"] = BenchmarkAction(values["action"])
        return cls(**values)


@dataclass(frozen=True)
class BenchmarkProgress:
    """Passed to ``on_progress``: where the benchmark is, and the current run's sampler step."""

    phase: Phase
    run: int  # 0 for the warm-up, 1..runs for measured runs
    runs: int
    step: int = 0
    steps: int = 0
    its: float | None = None  # smoothed sampler it/s of the current run
    message: str = ""


@dataclass(frozen=True)
class RunRecord:
    """One run (the warm-up or a measured one)."""

    run: int  # 0: warm-up
    seconds: float  # the run's duration (see BenchmarkReport.seconds for what it spans)
    wall_seconds: float  # submit to result, as the caller saw it
    its: float | None  # sampler it/s from progress events
    steps: int  # sampler steps seen
    output_path: str | None
    output_bytes: int = 0
    prompt: str = ""
    seed: int = 0
    telemetry: TelemetrySummary | None = None

    @property
    def warmup(self) -> bool:
        return self.run == 0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["telemetry"] = self.telemetry.to_dict() if self.telemetry else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        if values.get("telemetry") is not None:
            values["telemetry"] = TelemetrySummary.from_dict(values["telemetry"])
        return cls(**values)


@dataclass(frozen=True)
class Drift:
    """This run against the same node's earlier runs of the same workload."""

    flagged: bool = False
    text: str = ""  # human; empty when there was too little history
    history_median: float | None = None
    history_runs: int = 0
    ratio: float | None = None  # seconds / history_median

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Drift":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass(frozen=True)
class BenchmarkReport:
    """The outcome of one benchmark (or of a cached one: ``from_cache``).

    ``seconds`` is the median duration of a measured run: for a ``ComfyTarget`` from submitting
    the prompt to its result, for a ``WrapperTarget`` the wrapper's ``generation_ms`` (ComfyUI's
    part, without queueing or uploads). ``its`` is the median sampler it/s. ``max_perf`` is
    requests per second (1 / seconds), what the autoscaler calls max_perf.
    """

    status: BenchmarkStatus
    action: BenchmarkAction
    params: BenchmarkParams
    seconds: float | None = None
    its: float | None = None
    expected_seconds: float | None = None
    expected_source: str = "none"  # "setting" | "reference" | "none"
    expected_note: str = ""  # "reference NVIDIA L4 (8 it/s at 512x512)"
    ratio: float | None = None  # seconds / expected_seconds
    causes: list[str] = field(default_factory=list)
    drift: Drift = field(default_factory=Drift)
    load_seconds: float | None = None  # the warm-up run (loads the model)
    max_perf: float | None = None
    telemetry: TelemetrySummary | None = None  # over all measured runs
    gpu: GpuInfo | None = None
    comfyui_version: str = ""
    comfyui_device: str = ""  # ComfyUI's own device name, e.g. "cuda:0 NVIDIA L4 : cudaMallocAsync"
    comfyui_device_type: str = ""  # "cuda", "cpu", ...
    target: str = ""  # "wrapper http://..." or "comfyui http://..."
    runs: list[RunRecord] = field(default_factory=list)
    error: str | None = None
    graph_fingerprint: str = ""
    timestamp: float = field(default_factory=time.time)  # wall clock, when it finished
    duration_s: float = 0.0  # the whole benchmark, checks included
    from_cache: bool = False

    # --- views --------------------------------------------------------------------------------
    @property
    def ok(self) -> bool:
        """Nothing to hold against the node (pass, or measured without a reference)."""
        return self.status in (BenchmarkStatus.PASS, BenchmarkStatus.NO_REFERENCE)

    @property
    def gpu_name(self) -> str:
        if self.gpu is not None and self.gpu.name:
            return self.gpu.name
        return self.comfyui_device or "unknown"

    @property
    def measured_runs(self) -> list[RunRecord]:
        return [r for r in self.runs if not r.warmup]

    def reason(self) -> str:
        """One line for the worker state and logs."""
        cached = " (cached)" if self.from_cache else ""
        if self.status is BenchmarkStatus.ERROR:
            return f"benchmark failed{cached}: {self.error or 'unknown error'}"
        measured = f"{_fmt_s(self.seconds)} per run" + (f", {self.its:.1f} it/s" if self.its else "")
        if self.status is BenchmarkStatus.NO_REFERENCE:
            line = (f"benchmark{cached}: {self.expected_note or 'no reference for this GPU'} "
                    f"({measured}); set BENCHMARK_EXPECTED_SECONDS to judge it")
            if self.causes:
                line += ": " + "; ".join(self.causes)
        elif self.status is BenchmarkStatus.SLOW:
            percent = round(((self.ratio or 1.0) - 1.0) * 100)
            line = (f"benchmark{cached}: {percent}% slower than expected "
                    f"({_fmt_s(self.seconds)} vs {_fmt_s(self.expected_seconds)}): "
                    + ("; ".join(self.causes) if self.causes else "no cause found in telemetry"))
        else:
            line = (f"benchmark{cached}: passed ({_fmt_s(self.seconds)} vs "
                    f"{_fmt_s(self.expected_seconds)} expected"
                    + (f", {self.its:.1f} it/s" if self.its else "") + ")")
        if self.drift.flagged:
            line += f"; drift: {self.drift.text}"
        return line

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "action": self.action.value,
            "reason": self.reason(),
            "seconds": self.seconds,
            "its": self.its,
            "expected_seconds": self.expected_seconds,
            "expected_source": self.expected_source,
            "expected_note": self.expected_note,
            "ratio": self.ratio,
            "causes": list(self.causes),
            "drift": self.drift.to_dict(),
            "load_seconds": self.load_seconds,
            "max_perf": self.max_perf,
            "telemetry": self.telemetry.to_dict() if self.telemetry else None,
            "gpu": self.gpu.to_dict() if self.gpu else None,
            "comfyui_version": self.comfyui_version,
            "comfyui_device": self.comfyui_device,
            "comfyui_device_type": self.comfyui_device_type,
            "target": self.target,
            "params": self.params.to_dict(),
            "runs": [r.to_dict() for r in self.runs],
            "error": self.error,
            "graph_fingerprint": self.graph_fingerprint,
            "timestamp": self.timestamp,
            "duration_s": self.duration_s,
            "from_cache": self.from_cache,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchmarkReport":
        """Inverse of :meth:`to_dict` (``reason`` is derived, so it is not read back)."""
        return cls(
            status=BenchmarkStatus(data["status"]),
            action=BenchmarkAction(data["action"]),
            params=BenchmarkParams.from_dict(data.get("params") or {}),
            seconds=data.get("seconds"),
            its=data.get("its"),
            expected_seconds=data.get("expected_seconds"),
            expected_source=data.get("expected_source", "none"),
            expected_note=data.get("expected_note", ""),
            ratio=data.get("ratio"),
            causes=list(data.get("causes") or []),
            drift=Drift.from_dict(data.get("drift") or {}),
            load_seconds=data.get("load_seconds"),
            max_perf=data.get("max_perf"),
            telemetry=TelemetrySummary.from_dict(data["telemetry"]) if data.get("telemetry") else None,
            gpu=GpuInfo.from_dict(data["gpu"]) if data.get("gpu") else None,
            comfyui_version=data.get("comfyui_version", ""),
            comfyui_device=data.get("comfyui_device", ""),
            comfyui_device_type=data.get("comfyui_device_type", ""),
            target=data.get("target", ""),
            runs=[RunRecord.from_dict(r) for r in data.get("runs") or []],
            error=data.get("error"),
            graph_fingerprint=data.get("graph_fingerprint", ""),
            timestamp=float(data.get("timestamp") or 0.0),
            duration_s=float(data.get("duration_s") or 0.0),
            from_cache=bool(data.get("from_cache", False)),
        )


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "?"
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 10:
        return f"{value:.1f} s"
    return f"{value:.2f} s"
