"""The sampler's ring, window telemetry (mean, peak, energy) and trends."""

from __future__ import annotations

import asyncio

import pytest

from supervisor.gpu import fake
from supervisor.gpu.model import ClockEventReason
from supervisor.gpu.nvml import AsyncNvmlReader, NvmlReader
from supervisor.gpu.sampler import GpuSampler


class Clock:
    def __init__(self, t: float = 500.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def rig(*gpus):
    clock = Clock()
    nv = fake.FakeNvml(list(gpus) or [fake.h100_sxm()], clock=clock)
    sampler = GpuSampler(AsyncNvmlReader(NvmlReader(nv, clock=clock)), interval_s=1.0)
    return clock, nv, sampler


async def take(sampler, clock, nv, steps):
    """Each step: (seconds to advance, changes to GPU 0)."""
    for dt, changes in steps:
        clock.t += dt
        for key, value in changes.items():
            setattr(nv.gpus[0], key, value)
        await sampler.sample_once()


async def test_window_mean_peak_reasons_and_counter_energy():
    clock, nv, sampler = rig()
    t0 = clock.t
    await take(sampler, clock, nv, [
        (0, dict(temperature_c=50, power_w=100.0, sm_clock_mhz=1980)),
        (1, dict(temperature_c=60, power_w=300.0, sm_clock_mhz=1800, clock_event_reasons=["sw_power_cap"])),
        (1, dict(temperature_c=70, power_w=300.0, sm_clock_mhz=1500,
                 clock_event_reasons=["hw_thermal_slowdown"])),
        (1, dict(temperature_c=40, power_w=50.0, sm_clock_mhz=1980, clock_event_reasons=[])),
    ])
    win = sampler.window(t0, t0 + 3)
    (g,) = win.gpus
    assert g.samples == 4
    assert g.mean_temperature_c == pytest.approx(55.0)
    assert g.peak_temperature_c == 70
    assert g.mean_power_w == pytest.approx(187.5)
    assert g.peak_power_w == 300.0
    assert g.mean_sm_clock_mhz == pytest.approx(1815.0)
    assert g.reasons_seen == (ClockEventReason.SW_POWER_CAP, ClockEventReason.HW_THERMAL_SLOWDOWN)
    # The fake's counter grows by the draw at each read: 300 + 300 + 50 W over 1 s each.
    assert g.energy_source == "counter"
    assert g.energy_j == pytest.approx(650.0)
    assert g.covered_s == pytest.approx(3.0)
    assert win.to_dict()["gpus"][0]["reasons_seen"] == ["sw_power_cap", "hw_thermal_slowdown"]


async def test_energy_integrated_from_power_when_the_counter_is_unsupported():
    clock, nv, sampler = rig(fake.rtx_4090(unsupported={"energy"}))
    t0 = clock.t
    await take(sampler, clock, nv, [(0, dict(power_w=100.0)), (2, dict(power_w=300.0)),
                                    (2, dict(power_w=300.0))])
    (g,) = sampler.window(t0, t0 + 4).gpus
    assert g.energy_source == "integrated"
    assert g.energy_j == pytest.approx(400.0 + 600.0)  # trapezoids: (100+300)/2*2 + 300*2


async def test_short_window_between_samples_is_interpolated():
    clock, nv, sampler = rig(fake.h100_sxm(unsupported={"energy"}))
    t0 = clock.t
    await take(sampler, clock, nv, [(0, dict(power_w=100.0, temperature_c=50)),
                                    (10, dict(power_w=200.0, temperature_c=80))])
    (g,) = sampler.window(t0 + 2, t0 + 4).gpus
    # No sample inside: the state at the window's start describes it...
    assert g.samples == 1 and g.mean_temperature_c == 50
    # ...and the energy follows the straight line between the samples around it.
    assert g.energy_j == pytest.approx((120.0 + 140.0) / 2 * 2)
    assert g.covered_s == pytest.approx(2.0)


async def test_counter_reset_falls_back_to_integration():
    clock, nv, sampler = rig()
    t0 = clock.t
    await take(sampler, clock, nv, [(0, dict(power_w=100.0)), (1, {})])
    nv._energy.clear()  # the driver reloaded: the counter starts again below its last value
    nv.gpus[0].energy_mj = 0
    await take(sampler, clock, nv, [(1, {})])
    (g,) = sampler.window(t0, t0 + 2).gpus
    assert g.energy_source == "integrated" and g.energy_j == pytest.approx(200.0)


async def test_lost_gpu_and_window_before_any_sample():
    clock, nv, sampler = rig(fake.h100_sxm(), fake.h100_sxm(lost=True))
    assert sampler.window(clock.t, clock.t + 5).gpus == ()
    await sampler.sample_once()
    assert sampler.latest().gpus[1].available is False
    assert [g.index for g in sampler.window(clock.t - 1, clock.t + 1).gpus] == [0]
    with pytest.raises(ValueError):
        sampler.window(clock.t, clock.t - 1)


async def test_trend_over_the_last_samples():
    clock, nv, sampler = rig()
    steps = [(30, dict(temperature_c=40 + 2 * i,
                       clock_event_reasons=["sw_power_cap"] if i % 2 else [])) for i in range(10)]
    await take(sampler, clock, nv, steps)
    trend = sampler.trend(0, last_n=4)
    assert trend.samples == 4
    assert trend.temperature_slope_c_per_min == pytest.approx(4.0)  # 2 °C per 30 s
    assert trend.peak_temperature_c == 58
    assert trend.reason_fraction == {"sw_power_cap": 0.5}
    assert sampler.trend(7) is None


async def test_ring_is_bounded():
    clock = Clock()
    nv = fake.FakeNvml([fake.h100_sxm()], clock=clock)
    sampler = GpuSampler(AsyncNvmlReader(NvmlReader(nv, clock=clock)), capacity=3)
    for _ in range(5):
        clock.t += 1
        await sampler.sample_once()
    assert [s.monotonic for s in sampler.recent(10)] == [503.0, 504.0, 505.0]
    assert sampler.recent(0) == []


async def test_background_task_samples_until_stopped():
    nv = fake.scenario("healthy_datacenter")
    seen = []
    sampler = GpuSampler(AsyncNvmlReader(NvmlReader(nv)), interval_s=0.02,
                         our_pids=lambda: {4242}, on_sample=seen.append)
    await sampler.start()
    assert sampler.running
    for _ in range(100):
        if len(seen) >= 3:
            break
        await asyncio.sleep(0.01)
    await sampler.stop()
    assert not sampler.running
    count = len(seen)
    assert count >= 3
    await asyncio.sleep(0.06)
    assert len(seen) == count  # nothing after stop
    assert sampler.latest() is seen[-1] and sampler.latest().status.available
    times = [s.monotonic for s in seen]
    assert times == sorted(times)
    # Windows default to "until the latest sample".
    assert sampler.window(times[0]).gpus[0].samples == count


async def test_a_hung_read_skips_the_sample():
    class Hung(fake.FakeNvml):
        def nvmlDeviceGetCount(self):
            import time
            time.sleep(0.3)
            return super().nvmlDeviceGetCount()

    sampler = GpuSampler(AsyncNvmlReader(NvmlReader(Hung([fake.h100_sxm()])), timeout_s=0.05))
    assert await sampler.sample_once() is None
    assert sampler.latest() is None
