"""Verdicts and their exact human reasons, per scenario and per rule."""

from __future__ import annotations

import pytest

from supervisor.gpu import fake
from supervisor.gpu.model import EventKind, GpuEvent, HealthLevel, Severity
from supervisor.gpu.nvml import NvmlReader
from supervisor.gpu.policy import GpuPolicyThresholds, evaluate

OK, DEGRADED, UNHEALTHY = HealthLevel.OK, HealthLevel.DEGRADED, HealthLevel.UNHEALTHY


def snap_of(*gpus, **kw):
    return NvmlReader(fake.FakeNvml(list(gpus), **kw)).snapshot()


def event(xid, severity, meaning, gpu=0, at=1000.0, kind=EventKind.XID):
    return GpuEvent(time=0.0, monotonic=at, gpu_index=gpu, kind=kind, xid=xid, meaning=meaning,
                    severity=severity)


@pytest.mark.parametrize(
    "name, level, reasons",
    [
        ("healthy_datacenter", OK, []),
        ("consumer_no_ecc", OK, []),
        ("thermal_throttling", UNHEALTHY, ["GPU 0: HW thermal slowdown at 91 °C (slowdown at 90 °C)"]),
        ("power_capped", DEGRADED, ["GPU 0: power capped at 250 W (default 400 W)"]),
        ("pcie_x8_on_x16", DEGRADED, ["GPU 0: PCIe link Gen3 x8 (max Gen4 x16) while busy"]),
        ("gpu_lost", UNHEALTHY, ["GPU 1: lost"]),
        ("no_driver", UNHEALTHY, ["no NVIDIA driver/NVML: Driver Not Loaded"]),
    ],
)
def test_scenario_verdicts(name, level, reasons):
    verdict = evaluate(NvmlReader(fake.scenario(name)).snapshot(), [], required=True)
    assert verdict.level is level
    assert verdict.reasons == reasons
    assert verdict.to_dict()["level"] == level.value


def test_no_driver_is_fine_when_no_gpu_is_required():
    verdict = evaluate(NvmlReader(fake.scenario("no_driver")).snapshot(), [], required=False)
    assert verdict.level is OK and verdict.reasons == []
    assert verdict.notes == ["no NVIDIA driver/NVML: Driver Not Loaded (GPU not required)"]


def test_no_gpus_found():
    assert evaluate(snap_of()).reasons == ["no NVIDIA GPU found"]
    relaxed = evaluate(snap_of(), required=False)
    assert relaxed.level is OK and relaxed.notes == ["no NVIDIA GPU found (GPU not required)"]


def test_temperature_margins():
    near = evaluate(snap_of(fake.h100_sxm(temperature_c=86)))
    assert near.level is DEGRADED
    assert near.reasons == ["GPU 0: 86 °C, within 5 °C of slowdown at 90 °C"]
    assert evaluate(snap_of(fake.h100_sxm(temperature_c=84))).level is OK
    hot = evaluate(snap_of(fake.h100_sxm(temperature_c=94, clock_event_reasons=["hw_thermal_slowdown"])))
    assert hot.level is UNHEALTHY
    assert hot.reasons == ["GPU 0: HW thermal slowdown at 94 °C (slowdown at 90 °C)",
                           "GPU 0: 94 °C, near shutdown at 95 °C"]
    wide = evaluate(snap_of(fake.h100_sxm(temperature_c=80)), thresholds=GpuPolicyThresholds(temp_margin_c=12))
    assert wide.reasons == ["GPU 0: 80 °C, within 12 °C of slowdown at 90 °C"]


def test_other_slowdown_reasons():
    sw = evaluate(snap_of(fake.h100_sxm(temperature_c=70, clock_event_reasons=["sw_thermal_slowdown"])))
    assert sw.reasons == ["GPU 0: SW thermal slowdown at 70 °C (slowdown at 90 °C)"]
    brake = evaluate(snap_of(fake.h100_sxm(clock_event_reasons=["hw_slowdown", "hw_power_brake"])))
    assert brake.reasons == ["GPU 0: HW power brake slowdown (external power brake asserted)"]
    bare = evaluate(snap_of(fake.h100_sxm(temperature_c=50, clock_event_reasons=["hw_slowdown"])))
    assert bare.reasons == ["GPU 0: HW slowdown at 50 °C"]
    # Running at the power limit, idling, sync boost: normal operation.
    normal = evaluate(snap_of(fake.h100_sxm(clock_event_reasons=["sw_power_cap", "gpu_idle", "sync_boost"])))
    assert normal.level is OK


def test_power_cap_ratio():
    assert evaluate(snap_of(fake.a100_sxm(power_limit_w=370.0))).level is OK  # 92.5 % of 400 W
    assert evaluate(snap_of(fake.a100_sxm(power_limit_w=350.0))).reasons == [
        "GPU 0: power capped at 350 W (default 400 W)"]
    lenient = GpuPolicyThresholds(power_cap_ratio=0.5)
    assert evaluate(snap_of(fake.a100_sxm(power_limit_w=250.0)), thresholds=lenient).level is OK


def test_pcie_link_only_counts_while_busy():
    idle = fake.a100_sxm(pcie_gen=1, pcie_width=16, gpu_util_pct=0)  # power saving at idle
    assert evaluate(snap_of(idle)).level is OK
    busy = fake.a100_sxm(pcie_gen=4, pcie_width=8, gpu_util_pct=60)
    assert evaluate(snap_of(busy)).reasons == ["GPU 0: PCIe link Gen4 x8 (max Gen4 x16) while busy"]
    assert evaluate(snap_of(busy), thresholds=GpuPolicyThresholds(pcie_busy_util_pct=70)).level is OK


def test_pcie_replays_when_a_limit_is_set():
    gpu = fake.h100_sxm(pcie_replay=1500)
    assert evaluate(snap_of(gpu)).level is OK
    verdict = evaluate(snap_of(gpu), thresholds=GpuPolicyThresholds(pcie_replay_max=1000))
    assert verdict.reasons == ["GPU 0: 1500 PCIe replays (limit 1000)"]


def test_memory_errors():
    ecc = evaluate(snap_of(fake.h100_sxm(ecc_volatile_uncorrected=2, ecc_aggregate_uncorrected=9)))
    assert ecc.level is UNHEALTHY and ecc.reasons == ["GPU 0: 2 uncorrected ECC errors (volatile)"]
    one = evaluate(snap_of(fake.h100_sxm(ecc_volatile_uncorrected=1)))
    assert one.reasons == ["GPU 0: 1 uncorrected ECC error (volatile)"]
    # Corrected errors and lifetime history alone are not a problem.
    assert evaluate(snap_of(fake.h100_sxm(ecc_volatile_corrected=40, ecc_aggregate_uncorrected=3))).level is OK

    pending = evaluate(snap_of(fake.h100_sxm(remap_pending=True, remapped_uncorrected=1)))
    assert pending.level is DEGRADED and pending.reasons == ["GPU 0: row remap pending"]
    failed = evaluate(snap_of(fake.h100_sxm(remap_failure=True)))
    assert failed.level is UNHEALTHY and failed.reasons == ["GPU 0: row remap failed"]

    retiring = evaluate(snap_of(fake.v100_sxm(retired_double_bit=2, retired_pending=True)))
    assert retiring.level is DEGRADED and retiring.reasons == ["GPU 0: page retirement pending"]
    worn = evaluate(snap_of(fake.v100_sxm(retired_single_bit=40, retired_double_bit=24)))
    assert worn.level is UNHEALTHY and worn.reasons == ["GPU 0: 64 retired pages (limit 60)"]


def test_lost_and_unavailable_gpus():
    verdict = evaluate(snap_of(fake.h100_sxm(lost=True), fake.h100_sxm(handle_error="unknown"),
                               fake.h100_sxm()))
    assert verdict.level is UNHEALTHY
    assert verdict.reasons == ["GPU 0: lost", "GPU 1: unavailable (Unknown Error)"]


def test_events_by_severity_age_and_count():
    snap = snap_of(fake.h100_sxm())
    now = snap.monotonic
    events = [
        event(79, Severity.CRITICAL, "GPU has fallen off the bus", at=now - 86400),  # never ages out
        event(13, Severity.WARNING, "Graphics engine exception", at=now - 10),
        event(13, Severity.WARNING, "Graphics engine exception", at=now - 5),
        event(31, Severity.WARNING, "GPU memory page fault", at=now - 3600),  # aged out
        event(45, Severity.INFO, "Preemptive cleanup", gpu=None, at=now - 1),
        event(None, Severity.CRITICAL, "double-bit ECC error", gpu=1, kind=EventKind.DOUBLE_BIT_ECC, at=now),
    ]
    verdict = evaluate(snap, events)
    assert verdict.level is UNHEALTHY
    assert verdict.reasons == [
        "GPU 0: XID 79 (GPU has fallen off the bus)",
        "GPU 0: XID 13 (Graphics engine exception) x2",
        "GPU 1: double-bit ECC error",
    ]
    assert verdict.notes == ["GPU ?: XID 45 (Preemptive cleanup)"]
    warnings_only = evaluate(snap, events[1:3])
    assert warnings_only.level is DEGRADED
    assert evaluate(snap, events[1:3], now=now + 1000).level is OK


def test_foreign_processes_are_noted_and_optionally_degrade():
    gpu = fake.h100_sxm(processes=[{"pid": 10, "used_mib": 20000}, {"pid": 11, "used_mib": 100},
                                   {"pid": 12, "used_mib": 4000}])
    reader = NvmlReader(fake.FakeNvml([gpu]))
    snap = reader.snapshot(our_pids={12})
    verdict = evaluate(snap)
    assert verdict.level is OK and verdict.notes == ["GPU 0: foreign process 10 using 20000 MiB"]
    strict = evaluate(snap, thresholds=GpuPolicyThresholds(foreign_process_degrades=True))
    assert strict.level is DEGRADED and strict.reasons == ["GPU 0: foreign process 10 using 20000 MiB"]
    assert evaluate(reader.snapshot(), thresholds=GpuPolicyThresholds(foreign_process_degrades=True)).ok
