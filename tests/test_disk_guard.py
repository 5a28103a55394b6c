"""The disk guard's judgement (supervisor/checks/disk.py): levels, asks for space, verdicts.

Filesystems are given as readings (a sampler stand-in) so every level can be reached; one test
reads the real filesystem of a temporary folder. The end-to-end behaviour on a small real
filesystem is in tests/test_disk_e2e.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import psutil
import pytest

from api.host.disk import Room, format_bytes, room
from supervisor.autoscaler import AutoscalerEnv, StatusReporter
from supervisor.checks.disk import (
    DiskGuard,
    DiskThresholds,
    Filesystem,
    Freed,
    Watched,
    sample,
)
from supervisor.children.child import ChildState
from supervisor.state import OK, ChildView, Inputs, Level, Verdict, WorkerState, derive

GB = 1_000_000_000
OUT0, OUT1 = Path("/opt/ComfyUI/output"), Path("/data/instance1/output")
THRESHOLDS = DiskThresholds(warning_percent=90, warning_free=5 * GB, critical_percent=97,
                            critical_free=1 * GB)


def fs(device: int, free: float, total: float, *holds: Watched) -> Filesystem:
    return Filesystem(Room(holds[0].path, device, int(free * GB), int(total * GB)), holds)


class Disks:
    """A sampler stand-in: what each device reports now (tests change it between checks)."""

    def __init__(self, **free_by_device):
        self.free = dict(free_by_device)
        self.total = {}
        self.layout: dict[str, tuple[Watched, ...]] = {}

    def __call__(self, watched):
        by_device: dict[str, list[Watched]] = {}
        for w in watched:
            by_device.setdefault(self.device_of(w), []).append(w)
        return [fs(int(dev[1:]), self.free[dev], self.total.get(dev, 70.0), *holds)
                for dev, holds in by_device.items()]

    def device_of(self, w: Watched) -> str:
        if w.role == "models" and "d9" in self.free:
            return "d9"
        if w.instance == 1 and "d2" in self.free:
            return "d2"
        return "d1"


class Retention:
    """What a wrapper's retention answers: frees `frees` bytes from its disk each time."""

    def __init__(self, disks: Disks, device: str, frees: float, summary: str):
        self.disks, self.device, self.frees, self.summary = disks, device, frees, summary
        self.asks: list[tuple[int, int]] = []

    async def free(self, instance: int, want_bytes: int) -> Freed:
        self.asks.append((instance, want_bytes))
        self.disks.free[self.device] += self.frees
        return Freed(int(self.frees * GB), self.summary)


WATCHED = [Watched("outputs", OUT0, 0), Watched("inputs", Path("/opt/ComfyUI/input"), 0),
           Watched("state", Path("/var/lib/comfy-worker"), 0),
           Watched("models", Path("/opt/ComfyUI/models")),
           Watched("logs", Path("/var/log/comfy-worker"))]


def guard(disks, freer=None, watched=WATCHED, **kw) -> DiskGuard:
    return DiskGuard(watched, THRESHOLDS, interval=60, freer=freer, sampler=disks,
                     root=Path("/nonexistent-root-for-tests"), **kw)


def check(g: DiskGuard) -> None:
    asyncio.run(g.check())


def test_levels_by_percent_and_by_free_bytes():
    def level(free, total):
        return THRESHOLDS.level(Room(OUT0, 1, int(free * GB), int(total * GB)))

    assert level(50, 100) is Level.OK
    assert level(9, 100) is Level.DEGRADED        # 91% full
    assert level(4, 10) is Level.DEGRADED         # 60% full, but under 5 GB free
    assert level(2.9, 100) is Level.UNHEALTHY     # 97.1% full
    assert level(0.5, 2) is Level.UNHEALTHY       # under 1 GB free
    # To be under the warning again: 10% free and 5 GB free, whichever asks more.
    assert THRESHOLDS.to_free(Room(OUT0, 1, 2 * GB, 100 * GB)) == 8 * GB
    assert THRESHOLDS.to_free(Room(OUT0, 1, 2 * GB, 10 * GB)) == 3 * GB


def test_critical_takes_the_instance_out_with_the_issues_words_and_what_retention_said():
    disks = Disks(d1=2.1)
    freer = Retention(disks, "d1", 0, "retention freed 0 B: nothing finished is old enough")
    g = guard(disks, freer)
    check(g)
    verdict = g.verdict(0)
    assert verdict.level is Level.UNHEALTHY
    assert verdict.reason == ("disk /opt/ComfyUI/output 97% full (2.1 GB free); "
                              "retention freed 0 B: nothing finished is old enough")
    # Asked for what brings it back under the warning: 10% of 70 GB and 5 GB free.
    assert freer.asks == [(0, int(7 * GB - 2.1 * GB))]


def test_a_warning_asks_retention_at_once_and_is_gone_when_it_freed_enough():
    disks = Disks(d1=6.0)   # 91% of 70 GB
    freer = Retention(disks, "d1", 3.0, "retention freed 3.0 GB (3000 files)")
    g = guard(disks, freer)
    changes = []
    g.on_change = lambda: changes.append(g.verdict(0).level)
    check(g)
    assert freer.asks and g.verdict(0) is OK
    assert changes == [Level.OK]


def test_what_retention_cannot_free_stays_a_warning_that_says_so():
    disks = Disks(d1=6.0)
    freer = Retention(disks, "d1", 0, "retention freed 0 B: nothing finished is old enough")
    g = guard(disks, freer)
    check(g)
    verdict = g.verdict(0)
    assert verdict.level is Level.DEGRADED
    assert verdict.reason == ("disk /opt/ComfyUI/output 91% full (6.0 GB free); "
                              "retention freed 0 B: nothing finished is old enough")


def test_retention_that_freed_nothing_is_asked_again_only_after_a_while_or_when_it_is_worse():
    disks = Disks(d1=6.0)
    freer = Retention(disks, "d1", 0, "retention freed 0 B: nothing finished is old enough")
    g = guard(disks, freer, ask_every=3600)
    check(g)
    check(g)
    assert len(freer.asks) == 1
    assert "nothing finished is old enough" in g.verdict(0).reason  # still said
    disks.free["d1"] = 1.5   # now critical
    check(g)
    assert len(freer.asks) == 2
    assert g.verdict(0).level is Level.UNHEALTHY


def test_retention_that_frees_space_is_asked_at_every_sample_while_the_disk_fills():
    disks = Disks(d1=6.0)
    freer = Retention(disks, "d1", 0.5, "retention freed 500.0 MB")
    g = guard(disks, freer, ask_every=3600)
    for _ in range(3):
        disks.free["d1"] -= 1.0   # the node writes faster than one pass frees
        check(g)
    assert len(freer.asks) == 3


def test_space_returning_puts_the_instance_back():
    disks = Disks(d1=0.5)
    g = guard(disks)
    check(g)
    assert g.verdict(0).level is Level.UNHEALTHY
    disks.free["d1"] = 30.0
    check(g)
    assert g.verdict(0) is OK


def test_on_a_multi_gpu_host_only_the_instance_on_the_full_disk_goes_out():
    watched = WATCHED + [Watched("outputs", OUT1, 1), Watched("inputs", OUT1.parent / "input", 1)]
    disks = Disks(d1=30.0, d2=0.4)
    disks.total["d2"] = 10.0
    g = guard(disks, watched=watched)
    check(g)
    assert g.verdict(0) is OK
    out = g.verdict(1)
    assert out.level is Level.UNHEALTHY and out.reason.startswith(f"disk {OUT1} 96% full")
    shown = g.snapshot()["filesystems"]
    assert [f["holds"] for f in shown] == [
        "outputs of instance 0, inputs of instance 0, state of instance 0, logs, models",
        "outputs of instance 1, inputs of instance 1"]


def test_a_full_models_disk_is_a_warning_not_an_outage():
    disks = Disks(d1=30.0, d9=0.1)
    g = guard(disks)
    check(g)
    verdict = g.verdict(0)
    assert verdict.level is Level.DEGRADED
    assert verdict.reason.startswith("disk /opt/ComfyUI/models")


def test_the_worker_state_goes_unhealthy_on_critical_and_degraded_on_a_warning():
    ready = (ChildView("comfyui", ChildState.READY, "ok", True),
             ChildView("wrapper", ChildState.READY, "ok", True))
    critical = Verdict(Level.UNHEALTHY, ("disk /x 98% full (10 MB free)",))
    warning = Verdict(Level.DEGRADED, ("disk /x 91% full (6.0 GB free)",))
    assert derive(Inputs(ready, disk=critical)) == (WorkerState.UNHEALTHY,
                                                    "disk /x 98% full (10 MB free)")
    assert derive(Inputs(ready, disk=warning)) == (WorkerState.DEGRADED,
                                                   "disk /x 91% full (6.0 GB free)")
    assert derive(Inputs(ready, disk=OK))[0] is WorkerState.READY


def test_metrics_and_the_public_view_have_no_request_labels_and_no_paths():
    disks = Disks(d1=2.1)
    g = guard(disks)
    check(g)
    families = {f.name: f for f in g.metric_families()}
    assert set(families) == {"comfy_worker_disk_free_bytes", "comfy_worker_disk_size_bytes",
                             "comfy_worker_disk_level"}
    (sample_,) = families["comfy_worker_disk_level"].samples
    assert sample_.value == 2 and sample_.labels["path"] == str(OUT0)
    public = g.public()
    assert public["level"] == "unhealthy" and "path" not in public["filesystems"][0]
    assert str(OUT0) not in str(public["filesystems"])


def test_sample_reads_the_real_filesystem_and_groups_by_device(tmp_path):
    made, later = tmp_path / "output", tmp_path / "not-made-yet" / "input"
    made.mkdir()
    found = sample([Watched("outputs", made, 0), Watched("inputs", later, 0)])
    assert len(found) == 1 and {w.role for w in found[0].holds} == {"outputs", "inputs"}
    direct = room(tmp_path)
    assert abs(found[0].room.free - direct.free) < 64 * 1024 * 1024
    assert room(Path("/definitely/not/here")) is not None  # counted on / (its nearest parent)


def test_format_bytes_matches_the_reasons():
    assert format_bytes(2.1 * GB) == "2.1 GB" and format_bytes(0) == "0 B"


def test_the_autoscalers_disk_usage_is_the_guards_sample_measured_as_the_sdk_measures(tmp_path):
    g = DiskGuard([Watched("outputs", tmp_path, 0)], THRESHOLDS, interval=60, root=tmp_path)
    assert g.used_gib() is None  # before the first sample: the reporter measures itself
    check(g)
    # The SDK's figure: psutil.disk_usage("/").used / 2**30 (blocks in use, from statvfs).
    assert abs(g.used_gib() - psutil.disk_usage(str(tmp_path)).used / 2**30) < 0.05


async def test_the_reporter_sends_the_guards_figure_and_measures_nothing_itself(
        fake_autoscaler, tmp_path):
    env = AutoscalerEnv(report_addrs=(fake_autoscaler.url,), container_id=42,
                        master_token="m", public_ip="203.0.113.7", public_port=41234,
                        worker_port=3000)
    figures = iter([12.5, 12.75])
    async with aiohttp.ClientSession() as session:
        reporter = StatusReporter(env, session, timeout=1.0, disk_path="/nonexistent-path",
                                  disk_used=lambda: next(figures))
        assert await reporter.report_now()
        assert fake_autoscaler.statuses[-1]["disk_usage"] == 12.5
        assert await reporter.report_now()
    assert fake_autoscaler.statuses[-1]["disk_usage"] == 12.75
    assert fake_autoscaler.statuses[-1]["additional_disk_usage"] == pytest.approx(0.25)
