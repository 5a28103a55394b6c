"""The XID/ECC event watcher thread against the fake NVML."""

from __future__ import annotations

import asyncio
import json
import time

from supervisor.gpu import fake
from supervisor.gpu.events import EventWatchState, XidEventWatcher
from supervisor.gpu.model import EventKind, HealthLevel, Severity
from supervisor.gpu.nvml import NvmlReader
from supervisor.gpu.policy import evaluate
from tests.support.timing import allowance


def wait_for(predicate, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def started(nv, **kw):
    watcher = XidEventWatcher(NvmlReader(nv), wait_timeout_ms=50, **kw)
    watcher.start()
    watcher.wait_settled(3)
    return watcher


def test_xid_79_is_recorded_with_its_meaning_and_makes_the_gpu_unhealthy():
    nv = fake.scenario("xid_79")
    reader = NvmlReader(nv)
    watcher = XidEventWatcher(reader, wait_timeout_ms=50)
    watcher.start()
    try:
        status = watcher.wait_settled(3)
        assert status.state is EventWatchState.RUNNING and status.gpus == (0,)
        assert wait_for(lambda: watcher.events())
        (event,) = watcher.events()
        assert (event.gpu_index, event.kind, event.xid) == (0, EventKind.XID, 79)
        assert event.meaning == "GPU has fallen off the bus"
        assert event.severity is Severity.CRITICAL
        assert abs(event.time - time.time()) < 5
        verdict = evaluate(reader.snapshot(), watcher.events())
        assert verdict.level is HealthLevel.UNHEALTHY
        assert verdict.reasons == ["GPU 0: XID 79 (GPU has fallen off the bus)"]
    finally:
        watcher.stop()
    assert watcher.status().state is EventWatchState.STOPPED


def test_events_injected_while_running_reach_the_callback_and_the_history():
    nv = fake.FakeNvml([fake.h100_sxm(), fake.rtx_4090()])
    seen = []
    watcher = started(nv, on_event=seen.append)
    try:
        assert watcher.status().gpus == (0, 1)
        nv.inject_xid(1, 13)
        nv.inject_double_bit_ecc(0)
        nv.inject_xid(0, 4242)
        assert wait_for(lambda: len(seen) == 3)
        assert [(e.gpu_index, e.kind, e.xid, e.meaning, e.severity) for e in watcher.events()] == [
            (1, EventKind.XID, 13, "Graphics engine exception", Severity.WARNING),
            (0, EventKind.DOUBLE_BIT_ECC, None, "double-bit ECC error", Severity.CRITICAL),
            (0, EventKind.XID, 4242, "unknown XID", Severity.WARNING),
        ]
        assert seen == watcher.events()
        since = watcher.events()[1].monotonic
        assert [e.xid for e in watcher.events(since=since)] == [None, 4242]
    finally:
        watcher.stop()


def test_consumer_board_without_ecc_is_registered_for_xid_only():
    nv = fake.scenario("consumer_no_ecc")
    watcher = started(nv)
    try:
        nv.inject_double_bit_ecc(0)  # not registered: never delivered
        nv.inject_xid(0, 43)
        assert wait_for(lambda: watcher.events())
        time.sleep(0.1)
        assert [(e.xid, e.severity) for e in watcher.events()] == [(43, Severity.INFO)]
    finally:
        watcher.stop()


def test_stop_is_prompt_while_waiting():
    watcher = XidEventWatcher(NvmlReader(fake.scenario("healthy_datacenter")), wait_timeout_ms=200)
    watcher.start()
    watcher.wait_settled(3)
    t0 = time.monotonic()
    watcher.stop()
    assert time.monotonic() - t0 < allowance(1.0)
    assert not watcher._thread.is_alive()


def test_no_driver_degrades_to_events_not_supported():
    watcher = started(fake.scenario("no_driver"))
    status = watcher.status()
    assert status.state is EventWatchState.NOT_SUPPORTED
    assert status.detail == "events not supported: NVML no_driver: Driver Not Loaded"
    assert watcher.events() == []
    watcher.stop()


def test_event_sets_not_supported():
    nv = fake.FakeNvml([fake.h100_sxm()], events_supported=False)
    watcher = started(nv)
    assert watcher.status().state is EventWatchState.NOT_SUPPORTED
    assert watcher.status().detail == "events not supported: Not Supported"
    watcher.stop()


def test_no_gpu_accepting_events():
    nv = fake.FakeNvml([fake.h100_sxm(unsupported={"events"}), fake.h100_sxm(lost=True)])
    watcher = started(nv)
    assert watcher.status().state is EventWatchState.NOT_SUPPORTED
    assert watcher.status().detail == "events not supported: no GPU accepts XID or ECC event registration"
    watcher.stop()


def test_critical_events_survive_a_flood_of_minor_ones():
    nv = fake.scenario("xid_79")
    watcher = started(nv, max_events=5)
    try:
        assert wait_for(lambda: watcher.events())
        for _ in range(20):
            nv.inject_xid(0, 43)
        assert wait_for(lambda: len(watcher.events()) == 6)
        assert watcher.events()[0].xid == 79
        assert [e.xid for e in watcher.events()[1:]] == [43] * 5
    finally:
        watcher.stop()


def test_events_from_a_file_source_are_delivered_once(tmp_path):
    src = tmp_path / "gpus.json"
    src.write_text(json.dumps({"gpus": [{}, {}], "events": [{"gpu": 1, "xid": 48}]}))
    reader = NvmlReader(fake_source=src)
    watcher = XidEventWatcher(reader, wait_timeout_ms=50)
    watcher.start()
    try:
        assert watcher.wait_settled(3).state is EventWatchState.RUNNING
        assert wait_for(lambda: watcher.events())
        src.write_text(json.dumps({"gpus": [{}, {}], "events": [
            {"gpu": 1, "xid": 48}, {"gpu": 0, "xid": 94, "id": "later"}]}))
        assert wait_for(lambda: len(watcher.events()) == 2)
        time.sleep(0.15)  # several more polls of the same file
        assert [(e.gpu_index, e.xid) for e in watcher.events()] == [(1, 48), (0, 94)]
        verdict = evaluate(reader.snapshot(), watcher.events())
        assert verdict.reasons == ["GPU 1: XID 48 (Double-bit ECC error)",
                                   "GPU 0: XID 94 (Contained ECC error)"]
    finally:
        watcher.stop()


async def test_async_stop_and_threadsafe_handoff():
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    nv = fake.scenario("xid_79")
    watcher = XidEventWatcher(NvmlReader(nv), wait_timeout_ms=50,
                              on_event=lambda e: loop.call_soon_threadsafe(queue.put_nowait, e))
    watcher.start()
    event = await asyncio.wait_for(queue.get(), 3)
    assert event.xid == 79
    await watcher.astop()
    assert watcher.status().state is EventWatchState.STOPPED


def test_watcher_keeps_its_own_nvml_reference():
    nv = fake.scenario("healthy_datacenter")
    reader = NvmlReader(nv)
    watcher = XidEventWatcher(reader, wait_timeout_ms=50)
    watcher.start()
    assert watcher.wait_settled(3).state is EventWatchState.RUNNING
    reader.close()  # the daemon closing its reader first must not break the watch
    nv.inject_xid(0, 79)
    assert wait_for(lambda: watcher.events())
    watcher.stop()
    assert nv.init_count == 0
