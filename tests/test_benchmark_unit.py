"""The start-up benchmark: reference table, verdicts, causes, cache, drift, output checks, and
real runs against the ComfyUI simulator (directly and through the API wrapper)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
import urllib.request
from pathlib import Path

import pytest

from benchmark import (
    BenchmarkAction,
    BenchmarkParams,
    BenchmarkReport,
    BenchmarkStatus,
    BenchmarkStore,
    CacheKey,
    ComfyTarget,
    GpuInfo,
    OutputInvalid,
    Phase,
    SamplerTelemetry,
    TelemetrySummary,
    WrapperTarget,
    cached_benchmark,
    check_png,
    expectation,
    find_reference,
    graph_fingerprint,
    load_prompts,
    load_reference,
    progress_bar,
    render_progress,
    render_report,
    run_benchmark,
)
from benchmark.graph import DEFAULT_PROMPTS, build_graph, make_graph
from benchmark.models import BenchmarkProgress, Drift
from benchmark.reference import expected_seconds
from benchmark.telemetry import GpuProcessInfo
from benchmark.verdict import decide, diagnose, drift, rejudge
from config import load_settings
from simulator.images import write_png
from simulator.testing import start_simulator
from supervisor.gpu import fake
from supervisor.gpu.nvml import AsyncNvmlReader, NvmlReader
from supervisor.gpu.sampler import GpuSampler
from tests.support.procs import start_wrapper
from tests.support.timing import allowance

pytestmark = pytest.mark.timeout(60)

STEP_SECONDS = 0.05
SMALL = dict(width=64, height=64, steps=4)


def params(**changes) -> BenchmarkParams:
    return dataclasses.replace(BenchmarkParams(**SMALL, runs=2, run_timeout=20), **changes)


# --- reference table ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, label", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe / NVL"),
    ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB"),
    ("NVIDIA A100 80GB PCIe", "NVIDIA A100 80GB"),
    ("NVIDIA L40S", "NVIDIA L40S"),
    ("NVIDIA L4", "NVIDIA L4"),
    ("NVIDIA A10G", "NVIDIA A10G"),
    ("NVIDIA A10", "NVIDIA A10"),
    ("nvidia geforce rtx 4090", "NVIDIA GeForce RTX 4090"),
    ("NVIDIA RTX 6000 Ada Generation", "NVIDIA RTX 6000 Ada"),
    ("NVIDIA RTX A6000", "NVIDIA RTX A6000"),
    ("Tesla T4", "NVIDIA T4"),
    ("Tesla V100S-PCIE-32GB", "NVIDIA V100"),
    ("cuda:0 NVIDIA GeForce RTX 3090 : cudaMallocAsync", "NVIDIA GeForce RTX 3090"),
])
def test_reference_matches_nvml_names_longest_first(name, label):
    found = find_reference(name)
    assert found is not None and found.reference.label == label


@pytest.mark.parametrize("name", ["NVIDIA RTX A1000", "NVIDIA GeForce GTX 1080", "cpu", "", None])
def test_reference_does_not_match_other_cards(name):
    assert find_reference(name) is None


def test_reference_table_covers_the_common_cards():
    labels = " ".join(r.label for r in load_reference())
    for card in ("H100 SXM", "H100 PCIe", "A100 40GB", "A100 80GB", "L40S", "L4", "A10G", "A10",
                 "RTX 4090", "RTX 4080", "RTX 3090", "RTX 3080", "RTX A6000", "RTX 6000 Ada", "T4",
                 "V100"):
        assert card in labels


def test_expected_seconds_scale_with_pixels_and_steps():
    ref = find_reference("NVIDIA GeForce RTX 4090").reference
    base = expected_seconds(ref, width=512, height=512, steps=20)
    assert base == pytest.approx(20 / ref.its + ref.overhead_s)
    # Four times the pixels: a quarter of the it/s, so four times the sampling time.
    big = expected_seconds(ref, width=1024, height=1024, steps=20)
    assert big - ref.overhead_s == pytest.approx(4 * (base - ref.overhead_s))
    assert expected_seconds(ref, width=512, height=512, steps=40) - ref.overhead_s == \
        pytest.approx(2 * (base - ref.overhead_s))


def test_expected_seconds_setting_overrides_and_unknown_gpu_has_no_reference():
    exp = expectation("NVIDIA L4", width=512, height=512, steps=20, override_seconds=7.5)
    assert (exp.seconds, exp.source) == (7.5, "setting")
    assert "BENCHMARK_EXPECTED_SECONDS" in exp.note
    none = expectation("NVIDIA Mystery 9000", width=512, height=512, steps=20)
    assert none.seconds is None and none.note == "no reference for this GPU: NVIDIA Mystery 9000"
    # The setting also judges a GPU the table does not know.
    assert expectation("NVIDIA Mystery 9000", width=512, height=512, steps=20,
                       override_seconds=3).seconds == 3


# --- verdict ----------------------------------------------------------------------------------------
def test_slow_at_25_percent_over_and_pass_at_10_percent_over():
    exp = expectation("whatever", width=512, height=512, steps=20, override_seconds=10.0)
    status, ratio = decide(12.5, exp, 0.20)
    assert status is BenchmarkStatus.SLOW and ratio == pytest.approx(1.25)
    status, ratio = decide(11.0, exp, 0.20)
    assert status is BenchmarkStatus.PASS and ratio == pytest.approx(1.1)
    no_ref = expectation("whatever", width=512, height=512, steps=20)
    assert decide(11.0, no_ref, 0.2) == (BenchmarkStatus.NO_REFERENCE, None)


def sample_report(**changes) -> BenchmarkReport:
    base = BenchmarkReport(
        status=BenchmarkStatus.SLOW, action=BenchmarkAction.REFUSE, params=params(),
        seconds=12.5, its=1.6, expected_seconds=10.0, expected_source="setting", ratio=1.25,
        causes=["HW thermal slowdown during the run"], load_seconds=8.0, max_perf=0.08,
        gpu=GpuInfo(index=0, name="NVIDIA L4", uuid="GPU-1111", driver_version="550.54"),
        comfyui_version="0.3.64", comfyui_device="cuda:0 NVIDIA L4 : cudaMallocAsync",
        comfyui_device_type="cuda", graph_fingerprint="abc", target="comfyui http://x",
        telemetry=TelemetrySummary(samples=3, mean_temperature_c=80.0,
                                   reasons_seen=("hw_thermal_slowdown",)))
    return dataclasses.replace(base, **changes)


def test_reason_line_names_slowness_and_cause():
    assert sample_report().reason() == ("benchmark: 25% slower than expected (12.5 s vs 10.0 s): "
                                        "HW thermal slowdown during the run")
    assert passed().reason().startswith("benchmark: passed (10.2 s vs 10.0 s expected")
    failed = sample_report(status=BenchmarkStatus.ERROR, error="checkpoint missing")
    assert failed.reason() == "benchmark failed: checkpoint missing"


def test_report_round_trips_through_json():
    report = sample_report(drift=Drift(True, "30% slower", 9.6, 3, 1.3))
    again = BenchmarkReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report


def test_rejudge_applies_new_settings_to_a_cached_measurement():
    report = sample_report()
    relaxed = rejudge(report, expected_seconds=12.0, slow_threshold=0.2, action=BenchmarkAction.REPORT)
    assert relaxed.status is BenchmarkStatus.PASS and relaxed.action is BenchmarkAction.REPORT
    # Back to the table: the L4 reference at 64x64 expects far less than 12.5 s.
    table = rejudge(report, expected_seconds=0.0, slow_threshold=0.2, action=BenchmarkAction.REFUSE)
    assert table.status is BenchmarkStatus.SLOW and table.expected_source == "reference"


def test_causes_from_gpu_records_and_telemetry():
    gpu = GpuInfo(name="NVIDIA A100-SXM4-40GB", enforced_power_limit_w=250.0,
                  default_power_limit_w=400.0, sm_max_mhz=1410.0, pcie_gen=3, pcie_max_gen=4,
                  pcie_width=8, pcie_max_width=16, thermal_throttle_s=50.0)
    telemetry = TelemetrySummary(samples=4, mean_sm_clock_mhz=900.0, mean_power_w=249.0,
                                 reasons_seen=("sw_power_cap", "gpu_idle"))
    before = dataclasses.replace(gpu, thermal_throttle_s=40.0)
    causes = diagnose(gpu=gpu, telemetry=telemetry, device_type="cuda", throttle_before=before,
                      measured_seconds=20.0)
    text = "\n".join(causes)
    assert "SW power cap during the run (mean 249 W)" in text
    assert "power limit set to 250 W, below the default 400 W" in text
    assert "mean SM clock 900 MHz, 64% of its 1410 MHz maximum" in text
    assert "PCIe link at Gen3 x8, below its Gen4 x16 maximum" in text
    assert "10.0 s of thermal throttling" in text
    assert "idle" not in text  # an idle GPU is not a fault
    # An idle reading may show a stepped-down link generation; only a busy one counts.
    idle = diagnose(gpu=dataclasses.replace(gpu, pcie_width=16), telemetry=None, gpu_busy=False)
    assert not any("PCIe" in c for c in idle)
    cpu = diagnose(gpu=None, telemetry=None, device_type="cpu")
    assert len(cpu) == 1 and "ComfyUI runs on the CPU" in cpu[0]


def test_other_processes_on_the_gpu_are_named():
    gpu = GpuInfo(name="x", processes=(GpuProcessInfo(10, 2000.0, True), GpuProcessInfo(77, 3000.0, False)))
    (cause,) = diagnose(gpu=gpu, telemetry=None)
    assert cause == "1 other process(es) on the GPU (pid 77 using 3000 MiB)"


# --- cache and history ------------------------------------------------------------------------------
def passed() -> BenchmarkReport:
    return sample_report(status=BenchmarkStatus.PASS, seconds=10.2, ratio=1.02, causes=[])


def key(**changes) -> CacheKey:
    return dataclasses.replace(CacheKey.for_report(sample_report()), **changes)


def test_cache_reuses_only_an_unchanged_young_verdict(tmp_path):
    store = BenchmarkStore.for_state_dir(tmp_path)
    assert not store.lookup(key(), 3600).hit
    store.save(key(), passed(), now=1000.0)
    found = store.lookup(key(), 3600, now=1500.0)
    assert found.hit and found.report.from_cache and found.report.seconds == 10.2
    too_old = store.lookup(key(), 3600, now=1000.0 + 3601)
    assert not too_old.hit and "old" in too_old.why
    assert not store.lookup(key(), 0, now=1001.0).hit  # cache_max_age 0: never reused


@pytest.mark.parametrize("field, value", [
    ("gpu_uuid", "GPU-2222"), ("driver_version", "555.1"), ("comfyui_version", "0.3.65"),
    ("comfyui_device", "cpu"), ("graph_fingerprint", "def"), ("width", 768), ("height", 768),
    ("steps", 30), ("checkpoint", "other.safetensors"),
])
def test_cache_misses_when_any_key_part_changes(tmp_path, field, value):
    store = BenchmarkStore(tmp_path / "benchmark")
    store.save(key(), passed(), now=time.time())
    found = store.lookup(key(**{field: value}), 3600)
    assert not found.hit and field in found.why


def test_errors_and_slow_verdicts_are_not_cached_but_go_to_the_history(tmp_path):
    store = BenchmarkStore(tmp_path)
    store.save(key(), passed())
    failed = sample_report(status=BenchmarkStatus.ERROR, error="boom", seconds=None)
    store.save(key(), failed)
    store.append_history(key(), failed)
    assert not store.lookup(key(), 3600).hit  # and the older pass is gone with it
    store.save(key(), sample_report())  # slow: measure again at the next start
    assert not store.lookup(key(), 3600).hit
    (entry,) = store.history()
    assert entry["status"] == "error" and entry["reason"] == "benchmark failed: boom"
    assert store.history_seconds(key()) == []


def test_drift_against_the_nodes_own_history(tmp_path):
    store = BenchmarkStore(tmp_path)
    for seconds in (1.0, 1.02, 0.98):
        store.append_history(key(), sample_report(seconds=seconds))
    # Other GPUs and workloads do not count; a driver upgrade does (that is drift's point).
    store.append_history(key(gpu_uuid="GPU-other"), sample_report(seconds=5.0))
    store.append_history(key(steps=99), sample_report(seconds=5.0))
    store.append_history(key(driver_version="999"), sample_report(seconds=1.0))
    history = store.history_seconds(key())
    assert sorted(history) == [0.98, 1.0, 1.0, 1.02]
    slow = drift(1.3, history)
    assert slow.flagged and slow.text.startswith("30% slower than this node's median of 4")
    assert not drift(1.1, history).flagged
    assert drift(0.7, history).flagged  # far off either way is worth a look
    assert not drift(5.0, [1.0]).flagged  # one earlier run is too little to judge
    report = sample_report(drift=slow)
    assert report.reason().endswith("; drift: " + slow.text)


# --- outputs ------------------------------------------------------------------------------------------
def test_png_check_accepts_the_right_size_and_rejects_wrong_empty_and_truncated(tmp_path):
    good = tmp_path / "good.png"
    write_png(str(good), 64, 48, (10, 20, 30))
    info = check_png(good, 64, 48)
    assert (info.width, info.height) == (64, 48) and info.size_bytes > 0
    with pytest.raises(OutputInvalid, match="is 64x48, expected 64x64"):
        check_png(good, 64, 64)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(OutputInvalid, match="is empty"):
        check_png(empty, 64, 48)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:-12])
    with pytest.raises(OutputInvalid, match="truncated"):
        check_png(cut, 64, 48)
    html = tmp_path / "error.png"
    html.write_text("<html>502 Bad Gateway</html>")
    with pytest.raises(OutputInvalid, match="not a PNG"):
        check_png(html, 64, 48)
    with pytest.raises(OutputInvalid, match="does not exist"):
        check_png(tmp_path / "missing.png", 64, 48)
    with pytest.raises(OutputInvalid, match="no local path"):
        check_png(None, 64, 48)


# --- graph and prompts --------------------------------------------------------------------------------
def test_prompts_file_and_graph_fingerprint_ignore_prompt_and_seed():
    prompts = load_prompts()
    assert len(prompts) >= 30 and len(set(prompts)) == len(prompts)
    assert DEFAULT_PROMPTS.is_file()
    rng = random.Random(1)
    a = make_graph(**SMALL, checkpoint="m.safetensors", prompts=prompts, rng=rng)
    b = make_graph(**SMALL, checkpoint="m.safetensors", prompts=prompts, rng=rng)
    assert (a.prompt, a.seed) != (b.prompt, b.seed)
    assert a.fingerprint == b.fingerprint
    assert a.graph["6"]["inputs"]["text"] == a.prompt and a.graph["3"]["inputs"]["seed"] == a.seed
    assert a.graph["5"]["inputs"] == {"width": 64, "height": 64, "batch_size": 1}
    bigger = build_graph(width=64, height=64, steps=5, checkpoint="m.safetensors", prompt="x", seed=1)
    assert graph_fingerprint(bigger) != a.fingerprint


def test_a_prompts_file_without_prompts_is_an_error(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompts(path)


# --- rendering ----------------------------------------------------------------------------------------
def test_progress_bar_and_report_table():
    assert progress_bar(10, 20, width=10, its=4.1) == "[#####.....] 10/20 steps 4.1 it/s"
    assert progress_bar(0, 20, width=4) == "[....] 0/20 steps"
    line = render_progress(BenchmarkProgress(Phase.RUN, 1, 2, 3, 4, 9.5, "run 1/2"))
    assert line == "run 1/2 [###############.....] 3/4 steps 9.5 it/s"
    table = render_report(sample_report())
    assert "Verdict" in table and "slow" in table
    assert "12.50 s (median)" in table and "10.00 s" in table
    assert "  - HW thermal slowdown during the run" in table
    assert "NVIDIA L4 (GPU-1111, driver 550.54)" in table


# --- end to end against the simulator ------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with start_simulator(tmp_path_factory.mktemp("bench-sim"), "--step-seconds", str(STEP_SECONDS),
                         "--load-seconds", "0.2", "--device-type", "cuda") as handle:
        yield handle


@pytest.fixture
def comfy(sim):
    yield ComfyTarget(sim.url, sim.output_dir)
    sim.set_knobs(step_seconds=STEP_SECONDS, fail_node=[], slow_factor=1.0)


def history_count(sim) -> int:
    with urllib.request.urlopen(f"{sim.url}/history", timeout=5) as response:
        return len(json.loads(response.read()))


@pytest.mark.real_processes
async def test_run_against_comfyui_measures_checks_and_cleans_up(comfy, sim):
    seen = []
    report = await run_benchmark(comfy, params(), on_progress=seen.append, rng=random.Random(3))
    assert report.status is BenchmarkStatus.NO_REFERENCE, report.reason()
    assert "no reference for this GPU" in report.reason()
    # The sampler sleeps STEP_SECONDS per step: it/s is close to its inverse.
    assert 0.5 / STEP_SECONDS < report.its <= 1.25 / STEP_SECONDS
    assert [r.run for r in report.runs] == [0, 1, 2]
    assert all(r.steps == 4 and r.output_bytes > 0 for r in report.runs)
    assert report.load_seconds >= 0.2  # the warm-up loads the checkpoint
    assert report.seconds < report.load_seconds
    assert report.max_perf == pytest.approx(1 / report.seconds)
    assert report.comfyui_version and report.comfyui_device_type == "cuda"
    # Each image was checked, then removed.
    assert not list(sim.output_dir.glob("comfy-worker-benchmark*"))
    phases = [p.phase for p in seen]
    assert phases[0] is Phase.CHECKING and phases[-1] is Phase.DONE
    assert any(p.phase is Phase.RUN and p.step == 4 and p.steps == 4 for p in seen)


@pytest.mark.real_processes
async def test_missing_checkpoint_is_a_clear_error_without_running(comfy, sim, tmp_path):
    settings = load_settings(environ={}).with_overrides(
        benchmark__checkpoint="sd15-missing.safetensors", comfyui__install_path=Path("/opt/MyComfy"),
        benchmark__width=64, benchmark__height=64, benchmark__steps=4)
    before = history_count(sim)
    report = await run_benchmark(comfy, settings)
    assert report.status is BenchmarkStatus.ERROR
    assert "'sd15-missing.safetensors' is not installed" in report.error
    assert "/opt/MyComfy/models/checkpoints/" in report.error
    assert "extra_model_paths.yaml" in report.error and "v1-5-pruned-emaonly" in report.error
    assert report.runs == [] and history_count(sim) == before


@pytest.mark.real_processes
async def test_failed_run_and_timeout_are_errors_with_the_reason(comfy, sim):
    sim.set_knobs(fail_node=["KSampler"])
    report = await run_benchmark(comfy, params())
    assert report.status is BenchmarkStatus.ERROR
    assert report.error.startswith("warm-up (loads the model): ComfyUI failed in node 3 (KSampler)")
    sim.set_knobs(fail_node=[], step_seconds=0.4)
    started = time.monotonic()
    report = await run_benchmark(comfy, params(run_timeout=0.5))
    assert report.status is BenchmarkStatus.ERROR and "longer than 0.5 s" in report.error
    assert time.monotonic() - started < allowance(5)
    # The timed-out prompt was interrupted, so ComfyUI is free again soon.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{sim.url}/queue", timeout=5) as response:
            queue = json.loads(response.read())
        if not queue["queue_running"] and not queue["queue_pending"]:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the timed-out benchmark prompt is still in ComfyUI's queue")


@pytest.mark.real_processes
async def test_thermal_throttling_gpu_is_slow_with_causes(comfy, sim, tmp_path):
    # An H100 that throttles (fake NVML through the real sampler) against the H100 reference:
    # 4 steps of 64x64 should take ~0.3 s, the simulator takes ~0.4 s, 20% more is allowed.
    sim.set_knobs(step_seconds=0.1)
    nvml = fake.scenario("thermal_throttling")
    sampler = GpuSampler(AsyncNvmlReader(NvmlReader(nvml)), interval_s=60)
    store = BenchmarkStore(tmp_path / "benchmark")
    report = await run_benchmark(comfy, params(runs=1), SamplerTelemetry(sampler), store=store)
    assert report.status is BenchmarkStatus.SLOW, report.reason()
    assert report.expected_source == "reference" and "H100 SXM" in report.expected_note
    assert report.gpu.name == "NVIDIA H100 80GB HBM3" and report.gpu.uuid
    assert "HW thermal slowdown during the run (peak 91 °C)" in report.causes
    assert any(c.startswith("mean SM clock 1350 MHz") for c in report.causes)
    assert report.telemetry.samples >= 1 and report.runs[1].telemetry is not None
    assert report.reason().startswith("benchmark: ") and "slower than expected" in report.reason()
    assert "HW thermal slowdown" in report.reason()
    # In the history, but not cached: the next start measures again.
    assert len(store.history()) == 1 and store.history()[0]["status"] == "slow"
    assert not store.lookup(CacheKey.for_report(report), 3600).hit


@pytest.mark.real_processes
async def test_cached_benchmark_reuses_until_the_workload_changes(comfy, sim, tmp_path):
    store = BenchmarkStore(tmp_path / "benchmark")
    first = await cached_benchmark(comfy, params(runs=1), store=store)
    assert not first.from_cache and first.ok
    before = history_count(sim)
    again = await cached_benchmark(comfy, params(runs=1, expected_seconds=30.0), store=store)
    assert again.from_cache and history_count(sim) == before
    assert again.seconds == first.seconds
    # Re-judged with the setting now in force.
    assert again.status is BenchmarkStatus.PASS and again.expected_seconds == 30.0
    changed = await cached_benchmark(comfy, params(runs=1, steps=3), store=store)
    assert not changed.from_cache and changed.runs[-1].steps == 3
    forced = await cached_benchmark(comfy, params(runs=1, steps=3), store=store, force=True)
    assert not forced.from_cache
    assert len(store.history()) == 3


@pytest.mark.real_processes
def test_run_through_the_wrapper(sim, tmp_path):
    # The same path real requests take: POST /generate/stream, SSE progress, final result.
    with start_wrapper(tmp_path, sim.url, sim.output_dir) as wrapper:
        target = WrapperTarget(wrapper.url, sim.url, sim.output_dir)
        seen = []
        report = asyncio.run(run_benchmark(target, params(runs=1, expected_seconds=30.0),
                                           on_progress=seen.append))
    assert report.status is BenchmarkStatus.PASS, report.reason()
    assert report.target == f"wrapper {wrapper.url}"
    assert 0.5 / STEP_SECONDS < report.its <= 1.25 / STEP_SECONDS
    assert all(r.output_bytes > 0 for r in report.runs)
    assert any(p.phase is Phase.RUN and p.step == 4 for p in seen)
    # The wrapper's per-request copy and ComfyUI's own file are both gone.
    assert not list(sim.output_dir.rglob("comfy-worker-benchmark*"))
