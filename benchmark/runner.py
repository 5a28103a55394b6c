"""The start-up benchmark: check, warm up, measure, judge.

``run_benchmark`` always runs; ``cached_benchmark`` first looks for a still-valid verdict in the
store. Neither raises for anything that can go wrong on a node (ComfyUI down, checkpoint missing,
a failed or wrong-sized output): those become a report with status ``error`` and a reason that
says what to do. Only cancellation and programming errors escape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import aiohttp

from api.comfy import ClientTimeouts, ComfyClient, ComfyError, SystemStats
from benchmark.cache import BenchmarkStore, CacheKey
from benchmark.errors import BenchmarkError, CheckpointMissing, OutputInvalid, RunFailed
from benchmark.graph import load_prompts, make_graph, workload_fingerprint
from benchmark.models import (
    BenchmarkParams,
    BenchmarkProgress,
    BenchmarkReport,
    BenchmarkStatus,
    Phase,
    RunRecord,
)
from benchmark.png import PngInfo, check_png, check_png_data
from benchmark.reference import expectation
from benchmark.targets import (
    ComfyDriver,
    ComfyTarget,
    RunOutcome,
    Target,
    WrapperDriver,
    WrapperTarget,
    call_callback,
)
from benchmark.telemetry import (
    GpuInfo,
    NullTelemetry,
    TelemetrySource,
    TelemetrySummary,
    read_gpu,
    read_window,
)
from benchmark.verdict import decide, diagnose, drift, rejudge

__all__ = ["ComfyTarget", "ProgressCallback", "WrapperTarget", "cached_benchmark", "current_key",
           "missing_checkpoint_message", "run_benchmark"]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[BenchmarkProgress], Optional[Awaitable[Any]]]

# Short HTTP timeouts for the checks; a run itself is bounded by benchmark.run_timeout.
_CHECK_TIMEOUT = 30.0


@dataclasses.dataclass
class _Context:
    """What the checks found; every report (errors too) carries it."""

    params: BenchmarkParams
    target: Target
    stats: SystemStats | None = None
    gpu: GpuInfo | None = None
    fingerprint: str = ""
    started: float = dataclasses.field(default_factory=time.monotonic)
    client: ComfyClient | None = None  # for GET /view

    @property
    def device(self) -> tuple[str, str]:
        if self.stats is None or not self.stats.devices:
            return "", ""
        return self.stats.devices[0].name, self.stats.devices[0].type

    def report(self, status: BenchmarkStatus, **fields: Any) -> BenchmarkReport:
        name, kind = self.device
        return BenchmarkReport(
            status=status, action=self.params.action, params=self.params, gpu=self.gpu,
            comfyui_version=self.stats.comfyui_version if self.stats else "",
            comfyui_device=name, comfyui_device_type=kind, target=self.target.describe(),
            graph_fingerprint=self.fingerprint, timestamp=time.time(),
            duration_s=time.monotonic() - self.started, **fields)

    def key(self) -> CacheKey:
        return CacheKey.for_report(self.report(BenchmarkStatus.ERROR))


def _params(settings: Any) -> BenchmarkParams:
    return settings if isinstance(settings, BenchmarkParams) else BenchmarkParams.from_settings(settings)


def _install_path(settings: Any) -> str | None:
    comfyui = getattr(settings, "comfyui", None)
    path = getattr(comfyui, "install_path", None)
    return str(path) if path else None


def missing_checkpoint_message(checkpoint: str, available: list[str], install_path: str | None) -> str:
    folder = (f"{install_path.rstrip('/')}/models/checkpoints/" if install_path
              else "<ComfyUI>/models/checkpoints/")
    if available:
        shown = ", ".join(available[:5]) + (f" and {len(available) - 5} more" if len(available) > 5 else "")
        have = f"ComfyUI lists {len(available)} checkpoint(s): {shown}"
    else:
        have = "ComfyUI lists no checkpoints at all"
    return (f"benchmark checkpoint {checkpoint!r} is not installed ({have}). Put the file in "
            f"{folder} (or in a checkpoints folder named in ComfyUI's extra_model_paths.yaml) "
            f"and rerun the benchmark (or restart the worker), or set BENCHMARK_CHECKPOINT to an "
            f"installed SD1.5 checkpoint")


async def _open(target: Target) -> tuple[ComfyClient, Any, aiohttp.ClientSession | None]:
    if isinstance(target, ComfyTarget):
        client = ComfyClient(target.url, output_dir=target.output_dir,
                             timeouts=ClientTimeouts(request=_CHECK_TIMEOUT))
        return client, ComfyDriver(target, client), None
    client = ComfyClient(target.comfy_url, timeouts=ClientTimeouts(request=_CHECK_TIMEOUT))
    # No total timeout on the session: a run is bounded by benchmark.run_timeout instead.
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
    return client, WrapperDriver(target, session), session


async def _check(ctx: _Context, client: ComfyClient, install_path: str | None) -> None:
    try:
        ctx.stats = await client.system_stats(timeout=_CHECK_TIMEOUT)
        available = await client.list_checkpoints()
    except ComfyError as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise BenchmarkError(f"ComfyUI at {client.base_url} could not be asked: {reason}") from None
    wanted = ctx.params.checkpoint.replace("\\", "/")
    if not any(name.replace("\\", "/") == wanted for name in available):
        raise CheckpointMissing(ctx.params.checkpoint,
                                missing_checkpoint_message(ctx.params.checkpoint, available, install_path))


def _median(values: list[float | None]) -> float | None:
    usable = [v for v in values if v is not None]
    return statistics.median(usable) if usable else None


async def run_benchmark(target: Target, settings: Any, telemetry: TelemetrySource | None = None, *,
                        on_progress: ProgressCallback | None = None,
                        store: BenchmarkStore | None = None,
                        rng: random.Random | None = None,
                        keep_outputs: bool = False) -> BenchmarkReport:
    """Run the benchmark now and return its report (never raises for node problems).

    ``settings``: ``config.Settings`` (its ``[benchmark]`` section; ``comfyui.install_path``
    names the checkpoint folder in errors) or a :class:`BenchmarkParams`.
    ``telemetry``: the GPU ComfyUI runs on (default: none).
    ``on_progress``: called (sync or async) at each phase and sampler step.
    ``store``: when given, drift is judged against its history, the report is appended to the
    history and a good one (pass, no_reference) is cached.
    ``keep_outputs``: keep the benchmark images (by default each is deleted once checked).
    """
    params = _params(settings)
    telemetry = NullTelemetry() if telemetry is None else telemetry
    rng = random.SystemRandom() if rng is None else rng
    ctx = _Context(params, target)
    client, driver, session = await _open(target)
    ctx.client = client
    try:
        report = await _measure(ctx, client, driver, telemetry, store, rng, keep_outputs,
                                on_progress, _install_path(settings))
    finally:
        await client.close()
        if session is not None:
            await session.close()
    level = logging.INFO if report.status in (BenchmarkStatus.PASS, BenchmarkStatus.NO_REFERENCE) \
        else logging.WARNING
    logger.log(level, "%s", report.reason())
    if store is not None:
        await _persist(store, ctx.key(), report)
    await call_callback(on_progress, BenchmarkProgress(Phase.DONE, params.runs, params.runs,
                                                       message=report.reason()))
    return report


async def _measure(ctx: _Context, client: ComfyClient, driver: Any, telemetry: TelemetrySource,
                   store: BenchmarkStore | None, rng: random.Random, keep_outputs: bool,
                   on_progress: ProgressCallback | None, install_path: str | None) -> BenchmarkReport:
    params = ctx.params
    runs: list[RunRecord] = []
    checking = f"checking {ctx.target.describe()}"
    await call_callback(on_progress, BenchmarkProgress(Phase.CHECKING, 0, params.runs, message=checking))
    ctx.fingerprint = workload_fingerprint(width=params.width, height=params.height,
                                           steps=params.steps, checkpoint=params.checkpoint)
    try:
        ctx.gpu = await read_gpu(telemetry)
        await _check(ctx, client, install_path)
        try:
            prompts = await asyncio.to_thread(load_prompts, params.prompts_path)
        except ValueError as exc:
            raise BenchmarkError(str(exc)) from None
        history = await asyncio.to_thread(store.history_seconds, ctx.key()) if store else []

        warmup = await _one_run(0, ctx, driver, telemetry, prompts, rng, keep_outputs, on_progress)
        runs.append(warmup)
        before = await read_gpu(telemetry)
        busy: list[GpuInfo] = []
        first_start = time.monotonic()
        for number in range(1, params.runs + 1):
            runs.append(await _one_run(number, ctx, driver, telemetry, prompts, rng,
                                       keep_outputs, on_progress, busy))
        last_end = time.monotonic()
    except BenchmarkError as exc:
        return ctx.report(BenchmarkStatus.ERROR, error=str(exc), runs=runs)

    after = await read_gpu(telemetry)
    window = await read_window(telemetry, first_start, last_end)
    measured = [r for r in runs if not r.warmup]
    seconds = _median([r.seconds for r in measured])
    its = _median([r.its for r in measured])
    device_name, device_type = ctx.device
    gpu_now = busy[-1] if busy else after
    expected = expectation((ctx.gpu.name if ctx.gpu and ctx.gpu.name else device_name) or None,
                           width=params.width, height=params.height, steps=params.steps,
                           override_seconds=params.expected_seconds)
    status, ratio = decide(seconds, expected, params.slow_threshold)
    causes = diagnose(gpu=gpu_now or ctx.gpu, telemetry=window, device_type=device_type,
                      gpu_busy=bool(busy), throttle_before=before,
                      measured_seconds=sum(r.wall_seconds for r in measured))
    return ctx.report(
        status, seconds=seconds, its=its, expected_seconds=expected.seconds,
        expected_source=expected.source, expected_note=expected.note, ratio=ratio, causes=causes,
        drift=drift(seconds, history), load_seconds=runs[0].seconds,
        max_perf=(1.0 / seconds) if seconds else None, telemetry=window, runs=runs)


async def _one_run(number: int, ctx: _Context, driver: Any, telemetry: TelemetrySource,
                   prompts: list[str], rng: random.Random, keep_outputs: bool,
                   on_progress: ProgressCallback | None,
                   busy: list[GpuInfo] | None = None) -> RunRecord:
    params = ctx.params
    phase = Phase.WARMUP if number == 0 else Phase.RUN
    bench = make_graph(width=params.width, height=params.height, steps=params.steps,
                       checkpoint=params.checkpoint, prompts=prompts, rng=rng)
    run_id = f"benchmark-{os.urandom(8).hex()}"
    label = "warm-up (loads the model)" if number == 0 else f"run {number}/{params.runs}"
    await call_callback(on_progress, BenchmarkProgress(phase, number, params.runs, 0, params.steps,
                                                       message=label))
    capture: list[asyncio.Task] = []

    async def on_step(step: int, total: int, its: float | None) -> None:
        await call_callback(on_progress, BenchmarkProgress(phase, number, params.runs, step,
                                                           total or params.steps, its, label))
        # One GPU reading half-way through a measured run: PCIe link and clocks under load.
        if busy is not None and not capture and total and step * 2 >= total:
            capture.append(asyncio.create_task(_busy_reading(telemetry, busy)))

    await _mark(telemetry)
    since = time.monotonic()
    try:
        outcome = await driver.run(bench.graph, run_id, params.run_timeout, on_step)
        until = time.monotonic()
        info = await _check_image(ctx, outcome)
    except RunFailed as exc:
        raise type(exc)(f"{label}: {exc}") from None
    finally:
        for task in capture:
            try:
                await asyncio.wait_for(task, 10)
            except Exception:  # a missing reading only means fewer causes can be named
                pass
    if not keep_outputs:
        for path in (info.path, *outcome.other_files):
            await asyncio.to_thread(_remove_output, path)
    await _mark(telemetry)
    window: TelemetrySummary | None = await read_window(telemetry, since, until)
    logger.info("benchmark %s: %.2f s, %s it/s", label, outcome.seconds,
                f"{outcome.its:.2f}" if outcome.its else "?")
    return RunRecord(run=number, seconds=outcome.seconds, wall_seconds=outcome.wall_seconds,
                     its=outcome.its, steps=outcome.steps, output_path=str(info.path),
                     output_bytes=info.size_bytes, prompt=bench.prompt, seed=bench.seed,
                     telemetry=window)


async def _check_image(ctx: _Context, outcome: RunOutcome) -> PngInfo:
    """The image on disk where the run said; else fetched from ComfyUI's GET /view (ComfyUI on
    another host, or an output folder this process guessed wrong); else an error naming both."""
    params = ctx.params
    path = outcome.output_path
    on_disk = bool(path) and await asyncio.to_thread(os.path.isfile, path)
    if on_disk or outcome.comfy_file is None or ctx.client is None:
        return await asyncio.to_thread(check_png, path, params.width, params.height)
    file = outcome.comfy_file
    try:
        data = await ctx.client.view(file)
    except ComfyError as exc:
        raise OutputInvalid(
            f"output image {path or file.filename} is not on this machine's disk and GET /view "
            f"could not fetch it from ComfyUI ({exc}); set comfyui.output_dir "
            f"(COMFYUI_OUTPUT_DIR, or --output-dir) to the folder ComfyUI writes to") from None
    where = f"{ctx.client.base_url}/view?filename={file.filename}"
    return await asyncio.to_thread(check_png_data, data, where, params.width, params.height)


async def _mark(telemetry: TelemetrySource) -> None:
    try:
        await telemetry.mark()
    except Exception as exc:  # telemetry must never fail a benchmark
        logger.warning("benchmark: GPU telemetry mark failed: %s", exc)


async def _busy_reading(telemetry: TelemetrySource, into: list[GpuInfo]) -> None:
    await _mark(telemetry)
    info = await read_gpu(telemetry)
    if info is not None:
        into.append(info)


def _remove_output(path: Path) -> None:
    try:
        path.unlink()
    except OSError as exc:
        logger.debug("benchmark: could not remove %s: %s", path, exc)
        return
    try:
        # The wrapper copies outputs into a folder per request; drop it when it is now empty.
        if path.parent.name.startswith("benchmark-"):
            path.parent.rmdir()
    except OSError:
        pass


async def _persist(store: BenchmarkStore, key: CacheKey, report: BenchmarkReport) -> None:
    try:
        await asyncio.to_thread(store.append_history, key, report)
        await asyncio.to_thread(store.save, key, report)
    except OSError as exc:
        # The verdict stands without the files; the next start just runs again.
        logger.warning("benchmark: could not write %s: %s", store.folder, exc)


async def current_key(target: Target, settings: Any, telemetry: TelemetrySource | None = None
                      ) -> CacheKey | None:
    """The cache key this node has now, or None when ComfyUI cannot be asked."""
    params = _params(settings)
    ctx = _Context(params, target)
    ctx.gpu = await read_gpu(telemetry or NullTelemetry())
    url = target.url if isinstance(target, ComfyTarget) else target.comfy_url
    async with ComfyClient(url, timeouts=ClientTimeouts(request=_CHECK_TIMEOUT)) as client:
        try:
            ctx.stats = await client.system_stats(timeout=_CHECK_TIMEOUT)
        except ComfyError:
            return None
    ctx.fingerprint = workload_fingerprint(width=params.width, height=params.height,
                                           steps=params.steps, checkpoint=params.checkpoint)
    return ctx.key()


async def cached_benchmark(target: Target, settings: Any, telemetry: TelemetrySource | None = None,
                           *, store: BenchmarkStore, force: bool = False,
                           on_progress: ProgressCallback | None = None,
                           rng: random.Random | None = None,
                           keep_outputs: bool = False) -> BenchmarkReport:
    """A still-valid cached verdict (re-judged with the current thresholds), else a fresh run.

    ``force`` skips the cache (``comfy-worker benchmark --force``). The returned report has
    ``from_cache`` set when it was reused.
    """
    params = _params(settings)
    if not force:
        key = await current_key(target, params, telemetry)
        if key is not None:
            found = await asyncio.to_thread(store.lookup, key, params.cache_max_age)
            if found.report is not None:
                report = rejudge(found.report, expected_seconds=params.expected_seconds,
                                 slow_threshold=params.slow_threshold, action=params.action)
                logger.info("benchmark: %s; %s", found.why, report.reason())
                await call_callback(on_progress, BenchmarkProgress(Phase.DONE, 0, params.runs,
                                                                   message=report.reason()))
                return report
            logger.info("benchmark: running it (%s)", found.why)
    return await run_benchmark(target, settings, telemetry, on_progress=on_progress, store=store,
                               rng=rng, keep_outputs=keep_outputs)
