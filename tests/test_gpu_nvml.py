"""NvmlReader against the fake pynvml: records, unsupported fields, lost GPUs, no driver."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from supervisor.gpu import fake
from supervisor.gpu.errors import GpuReadTimeout
from supervisor.gpu.model import ClockEventReason, GpuState, NvmlState
from supervisor.gpu.nvml import (
    AsyncNvmlReader,
    NvmlReader,
    decode_clock_reasons,
    format_cuda_version,
    read_local_snapshot,
)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def read(name: str, **kw):
    return NvmlReader(fake.scenario(name), **kw).snapshot()


def test_healthy_datacenter_reads_every_field_in_human_units():
    snap = read("healthy_datacenter")
    assert snap.status.state is NvmlState.AVAILABLE
    assert snap.driver_version == "550.54.15" and snap.cuda_version == "12.4"
    (g,) = snap.gpus
    assert g.state is GpuState.AVAILABLE and g.index == 0
    assert g.name == "NVIDIA H100 80GB HBM3"
    assert g.serial == "1650923012345"
    assert g.uuid.startswith("GPU-")
    assert (g.driver_version, g.cuda_version) == ("550.54.15", "12.4")
    assert (g.temperature.current_c, g.temperature.slowdown_c, g.temperature.shutdown_c) == (38, 90, 95)
    # mW from NVML become W
    assert (g.power.draw_w, g.power.enforced_limit_w, g.power.default_limit_w) == (120.0, 700.0, 700.0)
    assert g.clocks.sm_mhz == 1980 and g.clocks.sm_max_mhz == 1980
    assert g.clocks.pstate == "P0"
    assert g.clocks.event_reasons == ()
    assert g.clocks.power_throttle_s == 0.0
    assert g.memory.total_mib == pytest.approx(81559.0)
    assert g.ecc.enabled is True and g.ecc.volatile_uncorrected == 0 and g.ecc.aggregate_corrected == 0
    # Hopper: row remapping yes, page retirement not supported
    assert g.remapped_rows.pending is False and g.remapped_rows.corrected == 0
    assert g.retired_pages.single_bit is None and g.retired_pages.total is None
    assert (g.pcie.gen, g.pcie.max_gen, g.pcie.width, g.pcie.max_width) == (5, 5, 16, 16)
    assert g.processes == ()
    assert g.field_errors == {}


def test_snapshot_is_json_ready():
    data = json.loads(json.dumps(read("thermal_throttling").to_dict()))
    gpu = data["gpus"][0]
    assert data["status"] == {"state": "available", "error": None}
    assert gpu["clocks"]["event_reasons"] == ["hw_thermal_slowdown"]
    assert gpu["clocks"]["thermal_throttle_s"] == 42.0  # violation ns -> s
    assert gpu["state"] == "available"


def test_consumer_card_unsupported_fields_become_none_not_errors():
    (g,) = read("consumer_no_ecc").gpus
    assert g.state is GpuState.AVAILABLE
    assert g.name == "NVIDIA GeForce RTX 4090"
    assert g.serial is None
    assert g.ecc.enabled is None and g.ecc.volatile_uncorrected is None
    assert g.remapped_rows.pending is None and g.retired_pages.total is None
    assert g.clocks.power_throttle_s is None and g.clocks.thermal_throttle_s is None
    assert g.power.default_limit_w == 450.0  # what is supported still reads
    assert g.field_errors == {}


def test_pre_ampere_reports_retired_pages_instead_of_remapped_rows():
    nv = fake.FakeNvml([fake.v100_sxm(retired_single_bit=2, retired_double_bit=1, retired_pending=True)])
    (g,) = NvmlReader(nv).snapshot().gpus
    assert (g.retired_pages.single_bit, g.retired_pages.double_bit, g.retired_pages.pending) == (2, 1, True)
    assert g.retired_pages.total == 3
    assert g.remapped_rows.corrected is None


def test_ecc_disabled_leaves_counters_unread():
    nv = fake.FakeNvml([fake.h100_sxm(ecc_enabled=False)])
    (g,) = NvmlReader(nv).snapshot().gpus
    assert g.ecc.enabled is False and g.ecc.volatile_corrected is None


def test_clock_reasons_decoded_to_names():
    assert decode_clock_reasons(0x004 | 0x040 | 0x080) == (
        ClockEventReason.SW_POWER_CAP, ClockEventReason.HW_THERMAL_SLOWDOWN, ClockEventReason.HW_POWER_BRAKE)
    assert decode_clock_reasons(0x001 | 0x002 | 0x010 | 0x020) == (
        ClockEventReason.GPU_IDLE, ClockEventReason.APPLICATIONS_CLOCKS,
        ClockEventReason.SYNC_BOOST, ClockEventReason.SW_THERMAL_SLOWDOWN)
    assert ClockEventReason.HW_SLOWDOWN.label == "HW slowdown"
    assert format_cuda_version(12040) == "12.4" and format_cuda_version(11080) == "11.8"


class OldNvml(fake.FakeNvml):
    """A pynvml from before the "clock event" rename: only the throttle name exists."""

    def __getattribute__(self, name):
        if name == "nvmlDeviceGetCurrentClocksEventReasons":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_falls_back_to_the_old_throttle_reasons_call():
    nv = OldNvml([fake.h100_sxm(clock_event_reasons=["sw_thermal_slowdown"])])
    (g,) = NvmlReader(nv).snapshot().gpus
    assert g.clocks.event_reasons == (ClockEventReason.SW_THERMAL_SLOWDOWN,)


def test_one_lost_gpu_does_not_hide_the_others():
    snap = read("gpu_lost")
    assert [g.state for g in snap.gpus] == [GpuState.AVAILABLE, GpuState.LOST]
    assert snap.gpus[0].temperature.current_c == 38
    lost = snap.gpus[1]
    assert lost.index == 1 and lost.error == "GPU is lost"
    assert lost.name is None and lost.temperature.current_c is None


def test_handle_error_makes_an_unavailable_record():
    nv = fake.FakeNvml([fake.h100_sxm(handle_error="unknown"), fake.h100_sxm()])
    snap = NvmlReader(nv).snapshot()
    assert snap.gpus[0].state is GpuState.UNAVAILABLE and snap.gpus[0].error == "Unknown Error"
    assert snap.gpus[1].state is GpuState.AVAILABLE


def test_handle_gpu_is_lost_counts_as_lost():
    nv = fake.FakeNvml([fake.h100_sxm(handle_error="gpu_is_lost")])
    assert NvmlReader(nv).snapshot().gpus[0].state is GpuState.LOST


def test_other_field_errors_are_kept_for_diagnosis():
    class Flaky(fake.FakeNvml):
        def nvmlDeviceGetPcieReplayCounter(self, handle):
            raise fake.NVMLError_Unknown()

    (g,) = NvmlReader(Flaky([fake.h100_sxm()])).snapshot().gpus
    assert g.state is GpuState.AVAILABLE
    assert g.pcie.replay_counter is None
    assert g.field_errors == {"pcie_replay": "Unknown Error"}


def test_no_driver_is_a_state_not_an_exception():
    reader = NvmlReader(fake.scenario("no_driver"))
    status = reader.status()
    assert status.state is NvmlState.NO_DRIVER and status.error == "Driver Not Loaded"
    snap = reader.snapshot()
    assert snap.status == status and snap.gpus == ()
    assert snap.to_dict()["status"] == {"state": "no_driver", "error": "Driver Not Loaded"}


def test_other_init_failure_is_an_error_state():
    nv = fake.FakeNvml([], init_error="no_permission")
    status = NvmlReader(nv).status()
    assert status.state is NvmlState.ERROR and status.error == "Insufficient Permissions"


def test_init_is_retried_after_the_retry_interval():
    clock = Clock()
    nv = fake.FakeNvml([fake.h100_sxm()], init_error="driver_not_loaded")
    reader = NvmlReader(nv, init_retry_s=30.0, clock=clock)
    assert reader.snapshot().status.state is NvmlState.NO_DRIVER
    nv.init_error = None  # the driver finished loading
    clock.t += 10
    assert reader.snapshot().status.state is NvmlState.NO_DRIVER  # too soon to try again
    clock.t += 25
    snap = reader.snapshot()
    assert snap.status.state is NvmlState.AVAILABLE and len(snap.gpus) == 1


def test_driver_vanishing_under_a_running_reader_is_reported():
    nv = fake.FakeNvml([fake.h100_sxm()])
    reader = NvmlReader(nv, init_retry_s=0.0)
    assert reader.snapshot().status.available
    nv.init_error = "driver_not_loaded"
    snap = reader.snapshot()
    assert snap.status.state is NvmlState.NO_DRIVER and snap.gpus == ()
    assert nv.init_count == 0  # it shut NVML down to start afresh
    nv.init_error = None
    assert reader.snapshot().status.available


def test_processes_flagged_against_our_pids():
    nv = fake.FakeNvml([fake.h100_sxm(processes=[{"pid": 100, "used_mib": 2048},
                                                  {"pid": 200, "used_mib": None}])])
    reader = NvmlReader(nv)
    (g,) = reader.snapshot(our_pids={100, 101}).gpus
    assert [(p.pid, p.used_mib, p.ours) for p in g.processes] == [(100, 2048.0, True), (200, None, False)]
    assert [p.pid for p in g.foreign_processes] == [200]
    (g,) = reader.snapshot().gpus  # no pid set given: unknown, not "foreign"
    assert [p.ours for p in g.processes] == [None, None] and g.foreign_processes == ()


def test_close_shuts_nvml_down():
    nv = fake.scenario("healthy_datacenter")
    with NvmlReader(nv) as reader:
        reader.snapshot()
        assert nv.init_count == 1
    assert nv.init_count == 0
    assert reader.snapshot().status.available  # usable again: it starts NVML afresh
    assert nv.init_count == 1


async def test_async_facade_reads_off_the_event_loop():
    nv = fake.scenario("healthy_datacenter")
    reader = AsyncNvmlReader(NvmlReader(nv))
    assert (await reader.status()).available
    snap = await reader.snapshot(our_pids=[1])
    assert snap.gpus[0].name == "NVIDIA H100 80GB HBM3"
    loop_thread = threading.get_ident()
    threads = {tid for name, tid in nv.calls if name in ("nvmlInit", "nvmlDeviceGetCount")}
    assert threads and loop_thread not in threads
    await reader.close()
    assert nv.init_count == 0


class SlowNvml(fake.FakeNvml):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.release = threading.Event()
        self.count_calls = 0

    def nvmlDeviceGetCount(self):
        self.count_calls += 1
        self.release.wait(5)
        return super().nvmlDeviceGetCount()


async def test_async_facade_shares_one_read_and_times_out():
    nv = SlowNvml([fake.h100_sxm(processes=[{"pid": 7, "used_mib": 1}])])
    reader = AsyncNvmlReader(NvmlReader(nv), timeout_s=0.2)
    with pytest.raises(GpuReadTimeout):
        await reader.snapshot()
    # The hung read is still in flight: new callers join it instead of piling up threads.
    pending = [asyncio.create_task(reader.snapshot(pids)) for pids in ({7}, {8})]
    await asyncio.sleep(0.05)
    nv.release.set()
    a, b = await asyncio.gather(*pending)
    assert nv.count_calls == 1
    assert a.gpus[0].processes[0].ours is True and b.gpus[0].processes[0].ours is False


def test_read_local_snapshot_from_a_fake_source(tmp_path):
    src = tmp_path / "gpus.json"
    src.write_text(json.dumps({"gpus": [{"preset": "rtx_4090", "temperature_c": 61}]}))
    snap = read_local_snapshot(fake_source=src)
    assert snap.status.available and snap.gpus[0].temperature.current_c == 61
    assert snap.gpus[0].name == "NVIDIA GeForce RTX 4090"


def test_read_local_snapshot_with_the_real_pynvml_never_raises():
    # Runs on whatever this host has: no driver here, real GPUs on a GPU host.
    snap = read_local_snapshot()
    json.dumps(snap.to_dict())
    if snap.status.available:
        assert snap.gpus and all(g.index == i for i, g in enumerate(snap.gpus))
    else:
        assert snap.status.error and snap.gpus == ()
