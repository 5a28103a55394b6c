"""The reader and the event watcher through the real pynvml, over a simulated libnvidia-ml.

No GPU is needed: pynvml's lookup of C functions is pointed at Python
stand-ins that fill the ctypes arguments the way the driver would. This checks
what the fake cannot: the names, argument types and result structures of the
real pynvml calls that nvml.py and events.py make.
"""

from __future__ import annotations

import ctypes
import time

import pynvml
import pytest

from supervisor.gpu.events import EventWatchState, XidEventWatcher
from supervisor.gpu.model import ClockEventReason, GpuState, NvmlState
from supervisor.gpu.nvml import NvmlReader
from supervisor.gpu.policy import evaluate

OK, NOT_SUPPORTED, INSUFFICIENT_SIZE, TIMEOUT, LOST = 0, 3, 7, 10, 15
MIB = 1024 * 1024


class SimulatedLibrary:
    """Two GPUs: 0 is a busy, thermally throttled H100; 1 has fallen off the bus."""

    def __init__(self, init_code: int = OK) -> None:
        self.init_code = init_code
        self.devices = [pynvml.struct_c_nvmlDevice_t() for _ in range(2)]
        self.lost = {1}
        self.pending_xids = [79]
        self.calls: list[str] = []
        self.hidden: set[str] = set()  # symbols this "driver" lacks

    def index(self, handle) -> int:
        address = ctypes.cast(handle, ctypes.c_void_p).value
        return next(i for i, d in enumerate(self.devices) if ctypes.addressof(d) == address)

    def lookup(self, name: str):
        impl = getattr(self, name, None)
        if impl is None or name in self.hidden:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

        def call(*args):
            self.calls.append(name)
            if args and isinstance(args[0], pynvml.c_nvmlDevice_t) and self.index(args[0]) in self.lost:
                return LOST
            return impl(*args)

        return call

    # -- system
    def nvmlInitWithFlags(self, flags):
        return self.init_code

    def nvmlShutdown(self):
        return OK

    def nvmlSystemGetDriverVersion(self, buf, size):
        buf.value = b"550.54.15"
        return OK

    def nvmlSystemGetCudaDriverVersion(self, ref):
        ref._obj.value = 12040
        return OK

    def nvmlDeviceGetCount_v2(self, ref):
        ref._obj.value = len(self.devices)
        return OK

    def nvmlDeviceGetHandleByIndex_v2(self, index, ref):
        ref._obj.contents = self.devices[index.value]
        return OK

    def nvmlDeviceGetIndex(self, handle, ref):
        ref._obj.value = self.index(handle)
        return OK

    # -- identity
    def nvmlDeviceGetName(self, handle, buf, size):
        buf.value = b"NVIDIA H100 80GB HBM3"
        return OK

    def nvmlDeviceGetUUID(self, handle, buf, size):
        buf.value = b"GPU-12345678-1234-1234-1234-123456789abc"
        return OK

    def nvmlDeviceGetSerial(self, handle, buf, size):
        return NOT_SUPPORTED

    # -- thermals, power, clocks
    def nvmlDeviceGetTemperature(self, handle, sensor, ref):
        assert sensor.value == pynvml.NVML_TEMPERATURE_GPU
        ref._obj.value = 91
        return OK

    def nvmlDeviceGetTemperatureThreshold(self, handle, which, ref):
        ref._obj.value = {pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: 90,
                          pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: 95}[which.value]
        return OK

    def nvmlDeviceGetPowerUsage(self, handle, ref):
        ref._obj.value = 612_345
        return OK

    def nvmlDeviceGetEnforcedPowerLimit(self, handle, ref):
        ref._obj.value = 700_000
        return OK

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle, ref):
        ref._obj.value = 700_000
        return OK

    def nvmlDeviceGetTotalEnergyConsumption(self, handle, ref):
        ref._obj.value = 987_654_321
        return OK

    def nvmlDeviceGetClockInfo(self, handle, kind, ref):
        ref._obj.value = {pynvml.NVML_CLOCK_SM: 1410, pynvml.NVML_CLOCK_MEM: 2619}[kind.value]
        return OK

    def nvmlDeviceGetMaxClockInfo(self, handle, kind, ref):
        ref._obj.value = {pynvml.NVML_CLOCK_SM: 1980, pynvml.NVML_CLOCK_MEM: 2619}[kind.value]
        return OK

    def nvmlDeviceGetPerformanceState(self, handle, ref):
        ref._obj.value = 0
        return OK

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle, ref):
        ref._obj.value = (pynvml.nvmlClocksEventReasonHwSlowdown
                          | pynvml.nvmlClocksEventReasonHwThermalSlowdown)
        return OK

    nvmlDeviceGetCurrentClocksThrottleReasons = nvmlDeviceGetCurrentClocksEventReasons

    def nvmlDeviceGetViolationStatus(self, handle, policy, ref):
        ref._obj.referenceTime = 1
        ref._obj.violationTime = {pynvml.NVML_PERF_POLICY_POWER: 0,
                                  pynvml.NVML_PERF_POLICY_THERMAL: 7_500_000_000}[policy.value]
        return OK

    # -- load, memory, ECC
    def nvmlDeviceGetUtilizationRates(self, handle, ref):
        ref._obj.gpu, ref._obj.memory = 99, 41
        return OK

    def nvmlDeviceGetMemoryInfo(self, handle, ref):
        ref._obj.total, ref._obj.used = 81559 * MIB, 20480 * MIB
        ref._obj.free = ref._obj.total - ref._obj.used
        return OK

    def nvmlDeviceGetEccMode(self, handle, current, pending):
        current._obj.value = pending._obj.value = pynvml.NVML_FEATURE_ENABLED
        return OK

    def nvmlDeviceGetTotalEccErrors(self, handle, error_type, counter, ref):
        uncorrected = error_type.value == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        volatile = counter.value == pynvml.NVML_VOLATILE_ECC
        ref._obj.value = {(False, True): 3, (True, True): 0, (False, False): 12, (True, False): 1}[
            (uncorrected, volatile)]
        return OK

    def nvmlDeviceGetRetiredPages(self, handle, cause, count, pages):
        return NOT_SUPPORTED

    def nvmlDeviceGetRemappedRows(self, handle, corr, unc, pending, failure):
        corr._obj.value, unc._obj.value, pending._obj.value, failure._obj.value = 2, 1, 1, 0
        return OK

    # -- PCIe
    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle, ref):
        ref._obj.value = 4
        return OK

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle, ref):
        ref._obj.value = 5
        return OK

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle, ref):
        ref._obj.value = 16
        return OK

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle, ref):
        ref._obj.value = 16
        return OK

    def nvmlDeviceGetPcieReplayCounter(self, handle, ref):
        ref._obj.value = 17
        return OK

    # -- processes (the two-call protocol: ask the size, then fill the array)
    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle, count, array):
        procs = [(4321, 18000 * MIB), (999, 1024 * MIB)]
        if array is None:
            count._obj.value = len(procs)
            return INSUFFICIENT_SIZE
        for i, (pid, used) in enumerate(procs):
            array[i].pid, array[i].usedGpuMemory = pid, used
        count._obj.value = len(procs)
        return OK

    nvmlDeviceGetComputeRunningProcesses_v2 = nvmlDeviceGetComputeRunningProcesses_v3

    # -- events
    def nvmlEventSetCreate(self, ref):
        return OK

    def nvmlDeviceGetSupportedEventTypes(self, handle, ref):
        ref._obj.value = (pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeDoubleBitEccError
                          | pynvml.nvmlEventTypePState)
        return OK

    def nvmlDeviceRegisterEvents(self, handle, types, event_set):
        assert types.value == (pynvml.nvmlEventTypeXidCriticalError
                               | pynvml.nvmlEventTypeDoubleBitEccError)
        return OK

    def nvmlEventSetWait_v2(self, event_set, ref, timeout_ms):
        if self.pending_xids:
            ref._obj.device = ctypes.pointer(self.devices[0])
            ref._obj.eventType = pynvml.nvmlEventTypeXidCriticalError
            ref._obj.eventData = self.pending_xids.pop(0)
            return OK
        time.sleep(min(timeout_ms.value, 20) / 1000)
        return TIMEOUT

    def nvmlEventSetFree(self, event_set):
        return OK


@pytest.fixture
def library(monkeypatch):
    lib = SimulatedLibrary()
    monkeypatch.setattr(pynvml, "_LoadNvmlLibrary", lambda: None)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer", lib.lookup)
    return lib


def test_reader_through_real_pynvml(library):
    with NvmlReader(pynvml) as reader:
        snap = reader.snapshot(our_pids={4321})
    assert snap.status.state is NvmlState.AVAILABLE
    assert (snap.driver_version, snap.cuda_version) == ("550.54.15", "12.4")
    g, lost = snap.gpus
    assert lost.state is GpuState.LOST and lost.error == "GPU is lost"
    assert g.name == "NVIDIA H100 80GB HBM3" and g.uuid.startswith("GPU-12345678")
    assert g.serial is None  # not supported
    assert (g.temperature.current_c, g.temperature.slowdown_c, g.temperature.shutdown_c) == (91, 90, 95)
    assert g.power.draw_w == pytest.approx(612.345) and g.power.default_limit_w == 700.0
    assert g.power.energy_mj == 987_654_321
    assert (g.clocks.sm_mhz, g.clocks.sm_max_mhz, g.clocks.mem_mhz, g.clocks.pstate) == (1410, 1980, 2619, "P0")
    assert g.clocks.event_reasons == (ClockEventReason.HW_SLOWDOWN, ClockEventReason.HW_THERMAL_SLOWDOWN)
    assert g.clocks.thermal_throttle_s == 7.5 and g.clocks.power_throttle_s == 0.0
    assert (g.utilization.gpu_pct, g.utilization.memory_pct) == (99, 41)
    assert (g.memory.used_mib, g.memory.total_mib) == (20480, 81559)
    assert (g.ecc.enabled, g.ecc.volatile_corrected, g.ecc.volatile_uncorrected,
            g.ecc.aggregate_corrected, g.ecc.aggregate_uncorrected) == (True, 3, 0, 12, 1)
    assert g.retired_pages.total is None
    assert (g.remapped_rows.corrected, g.remapped_rows.uncorrected,
            g.remapped_rows.pending, g.remapped_rows.failure) == (2, 1, True, False)
    assert (g.pcie.gen, g.pcie.max_gen, g.pcie.width, g.pcie.max_width, g.pcie.replay_counter) == (
        4, 5, 16, 16, 17)
    assert [(p.pid, p.used_mib, p.ours) for p in g.processes] == [(4321, 18000, True), (999, 1024, False)]
    assert g.field_errors == {}

    verdict = evaluate(snap)
    assert verdict.reasons == [
        "GPU 0: HW thermal slowdown at 91 °C (slowdown at 90 °C)",
        "GPU 0: PCIe link Gen4 x16 (max Gen5 x16) while busy",
        "GPU 0: row remap pending",
        "GPU 1: lost",
    ]
    assert verdict.notes == ["GPU 0: foreign process 999 using 1024 MiB"]


def test_no_driver_through_real_pynvml(monkeypatch):
    lib = SimulatedLibrary(init_code=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    monkeypatch.setattr(pynvml, "_LoadNvmlLibrary", lambda: None)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer", lib.lookup)
    status = NvmlReader(pynvml).status()
    assert status.state is NvmlState.NO_DRIVER and status.error == "Driver Not Loaded"


def test_old_driver_without_newer_symbols(library):
    # A driver from before the "clock event" rename and the v3 process struct.
    library.hidden = {"nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetComputeRunningProcesses_v3"}
    g = NvmlReader(pynvml).snapshot().gpus[0]
    assert g.clocks.event_reasons == (ClockEventReason.HW_SLOWDOWN, ClockEventReason.HW_THERMAL_SLOWDOWN)
    assert [p.pid for p in g.processes] == [4321, 999]
    assert g.field_errors == {}
    assert "nvmlDeviceGetCurrentClocksThrottleReasons" in library.calls
    assert "nvmlDeviceGetComputeRunningProcesses_v2" in library.calls


def test_event_watcher_through_real_pynvml(library):
    watcher = XidEventWatcher(NvmlReader(pynvml), wait_timeout_ms=50)
    watcher.start()
    try:
        status = watcher.wait_settled(3)
        assert status.state is EventWatchState.RUNNING and status.gpus == (0,)  # GPU 1 is lost
        deadline = time.monotonic() + 3
        while not watcher.events() and time.monotonic() < deadline:
            time.sleep(0.01)
        (event,) = watcher.events()
        assert (event.gpu_index, event.xid, event.meaning) == (0, 79, "GPU has fallen off the bus")
    finally:
        watcher.stop()
    assert watcher.status().state is EventWatchState.STOPPED
