"""The fake NVML itself: scenarios and the file source a running daemon follows."""

from __future__ import annotations

import json
import os

import pytest

from supervisor.gpu import fake
from supervisor.gpu.errors import FakeSourceError
from supervisor.gpu.model import ClockEventReason, GpuState, NvmlState
from supervisor.gpu.nvml import NvmlReader
from supervisor.gpu.policy import evaluate


def write(path, data) -> None:
    # Write then rename, as an operator's editor or a test harness would.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def test_every_scenario_builds_and_unknown_names_are_refused():
    assert set(fake.SCENARIOS) == {
        "healthy_datacenter", "consumer_no_ecc", "thermal_throttling", "power_capped",
        "pcie_x8_on_x16", "xid_79", "gpu_lost", "no_driver"}
    for name in fake.SCENARIOS:
        assert isinstance(fake.scenario(name), fake.FakeNvml)
    with pytest.raises(FakeSourceError, match="unknown scenario 'nope'"):
        fake.scenario("nope")


def test_fake_errors_mirror_pynvml_names_and_codes():
    import pynvml

    for name in ("NVMLError_NotSupported", "NVMLError_GpuIsLost", "NVMLError_Timeout",
                 "NVMLError_DriverNotLoaded", "NVMLError_LibraryNotFound", "NVMLError_Unknown"):
        ours, theirs = getattr(fake.FakeNvml, name), getattr(pynvml, name)
        assert issubclass(ours, fake.NVMLError)
        assert ours().value == theirs().value and str(ours()) == str(theirs())
    for name in ("NVML_TEMPERATURE_THRESHOLD_SLOWDOWN", "NVML_CLOCK_SM", "NVML_CLOCK_MEM",
                 "NVML_PERF_POLICY_THERMAL", "nvmlEventTypeXidCriticalError",
                 "nvmlEventTypeDoubleBitEccError", "nvmlClocksEventReasonHwThermalSlowdown",
                 "NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR", "NVML_AGGREGATE_ECC"):
        assert getattr(fake.FakeNvml, name) == getattr(pynvml, name), name


def test_fake_has_every_pynvml_function_the_reader_calls():
    import pynvml

    called = [n for n in dir(fake.FakeNvml) if n.startswith("nvml")]
    missing = [n for n in called if not hasattr(pynvml, n)]
    assert missing == []


def test_file_source_changes_are_picked_up_while_running(tmp_path):
    src = tmp_path / "gpus.json"
    write(src, {"gpus": [{"preset": "h100_sxm", "temperature_c": 60}]})
    reader = NvmlReader(fake_source=src)  # as the daemon does with GPU_FAKE_SOURCE
    snap = reader.snapshot()
    assert snap.gpus[0].temperature.current_c == 60
    assert evaluate(snap).level.value == "ok"

    # Flip thermal slowdown on...
    write(src, {"gpus": [{"temperature_c": 91, "clock_event_reasons": ["hw_thermal_slowdown"]}]})
    snap = reader.snapshot()
    assert snap.gpus[0].clocks.event_reasons == (ClockEventReason.HW_THERMAL_SLOWDOWN,)
    assert evaluate(snap).reasons == ["GPU 0: HW thermal slowdown at 91 °C (slowdown at 90 °C)"]

    # ...and off again, with a second GPU appearing.
    write(src, {"gpus": [{"temperature_c": 55}, {"preset": "rtx_4090"}]})
    snap = reader.snapshot()
    assert [g.name for g in snap.gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090"]
    assert evaluate(snap).level.value == "ok"


def test_file_source_lost_gpu_and_unsupported_fields(tmp_path):
    src = tmp_path / "gpus.json"
    write(src, {"gpus": [{"unsupported": ["serial", "pcie"]}, {"lost": True}]})
    snap = NvmlReader(fake_source=src).snapshot()
    assert snap.gpus[0].serial is None and snap.gpus[0].pcie.gen is None
    assert snap.gpus[0].remapped_rows.pending is False  # the preset's support is kept
    assert snap.gpus[0].retired_pages.total is None  # ...and so is what it lacks
    assert snap.gpus[1].state is GpuState.LOST


def test_broken_file_keeps_the_last_good_description(tmp_path):
    src = tmp_path / "gpus.json"
    write(src, {"gpus": [{"temperature_c": 44}]})
    reader = NvmlReader(fake_source=src)
    assert reader.snapshot().gpus[0].temperature.current_c == 44
    src.write_text('{"gpus": [{"temperature_c": ')  # half written
    assert reader.snapshot().gpus[0].temperature.current_c == 44
    write(src, {"gpus": [{"temperatur_c": 50}]})  # a typo is named, not applied
    assert reader.snapshot().gpus[0].temperature.current_c == 44
    write(src, {"gpus": [{"temperature_c": 50}]})
    assert reader.snapshot().gpus[0].temperature.current_c == 50


def test_unreadable_file_from_the_start_is_an_nvml_error(tmp_path):
    src = tmp_path / "missing.json"
    status = NvmlReader(fake_source=src).status()
    assert status.state is NvmlState.ERROR
    assert "missing.json" in status.error


def test_file_source_can_switch_the_driver_off_and_on(tmp_path):
    src = tmp_path / "gpus.json"
    write(src, {"nvml_error": "driver_not_loaded"})
    reader = NvmlReader(fake_source=src, init_retry_s=0.0)
    assert reader.snapshot().status.state is NvmlState.NO_DRIVER
    write(src, {"gpus": [{}]})
    assert reader.snapshot().status.state is NvmlState.AVAILABLE
    write(src, {"nvml_error": "driver_not_loaded", "gpus": [{}]})
    assert reader.snapshot().status.state is NvmlState.NO_DRIVER


def test_file_validation_messages_name_the_field():
    with pytest.raises(FakeSourceError, match=r"gpus\[0\]: unknown field\(s\) \['temp'\]"):
        fake._parse_source({"gpus": [{"temp": 1}]})
    with pytest.raises(FakeSourceError, match=r"gpus\[0\].preset: unknown 'gtx'"):
        fake._parse_source({"gpus": [{"preset": "gtx"}]})
    with pytest.raises(FakeSourceError, match="clock_event_reasons: unknown"):
        fake._parse_source({"gpus": [{"clock_event_reasons": ["hot"]}]})
    with pytest.raises(FakeSourceError, match=r"events\[0\]: an XID event needs 'xid'"):
        fake._parse_source({"events": [{"gpu": 0}]})
    with pytest.raises(FakeSourceError, match="nvml_error: unknown error name 'gone'"):
        fake._parse_source({"nvml_error": "gone"})


def test_energy_counter_grows_with_power_over_time():
    clock = [100.0]
    nv = fake.FakeNvml([fake.h100_sxm(power_w=250.0, energy_mj=5000)], clock=lambda: clock[0])
    nv.nvmlInit()
    h = nv.nvmlDeviceGetHandleByIndex(0)
    assert nv.nvmlDeviceGetTotalEnergyConsumption(h) == 5000
    clock[0] += 2.0
    assert nv.nvmlDeviceGetTotalEnergyConsumption(h) == 5000 + 500_000  # 250 W * 2 s = 500 J
