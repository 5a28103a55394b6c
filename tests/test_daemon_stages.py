"""The daemon's lifecycle as data: stages start in order, stop in reverse, each stop within its
timeout; the stop budget is the sum of the timeouts the daemon really uses."""

from __future__ import annotations

import asyncio
import logging

import pytest

from config import load_settings
from supervisor.daemon.daemon import Daemon, stop_budget, stop_timeouts
from supervisor.daemon.stages import Stage, Stages, budget


def recorder(log: list[str], name: str):
    async def start() -> None:
        log.append(f"start {name}")

    async def stop() -> None:
        log.append(f"stop {name}")

    return Stage(name, start, stop, 1.0)


async def test_stages_start_in_order_and_stop_in_reverse():
    log: list[str] = []
    stages = Stages([recorder(log, n) for n in ("a", "b", "c")])
    await stages.start()
    await stages.stop()
    assert log == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]


async def test_a_failed_start_stops_what_started_and_nothing_else():
    log: list[str] = []

    async def broken() -> None:
        log.append("start b")
        raise RuntimeError("port taken")

    stages = Stages([recorder(log, "a"), Stage("b", broken, recorder(log, "b").stop),
                     recorder(log, "c")])
    with pytest.raises(RuntimeError, match="port taken"):
        await stages.start()
    await stages.stop()
    # b had begun (it may hold a half-made socket), so it is stopped too; c never started.
    assert log == ["start a", "start b", "stop b", "stop a"]


async def test_a_stop_that_overruns_is_logged_with_what_runs_and_the_rest_goes_on(caplog):
    log: list[str] = []
    hung = asyncio.Event()

    async def stuck_stop() -> None:
        await hung.wait()

    stages = Stages([recorder(log, "first"),
                     Stage("stuck", stop=stuck_stop, stop_timeout=0.2,
                           timeout_name="worker.something_timeout",
                           running=lambda: "2 requests in flight")])
    await stages.start()
    loop = asyncio.get_running_loop()
    began = loop.time()
    with caplog.at_level(logging.WARNING, logger="supervisor.daemon.stages"):
        await stages.stop()
    took = loop.time() - began
    assert log == ["start first", "stop first"]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "stopping stuck took longer than 0.2 s (worker.something_timeout)" in warning
    assert "still running: 2 requests in flight" in warning
    # It gave up on time; it did not wait for the stuck stop.
    assert took < 5 * 0.2 + 1


async def test_a_stop_that_fails_is_logged_and_the_rest_goes_on(caplog):
    log: list[str] = []

    async def failing() -> None:
        raise OSError("socket gone")

    stages = Stages([recorder(log, "first"), Stage("broken", stop=failing)])
    await stages.start()
    with caplog.at_level(logging.ERROR, logger="supervisor.daemon.stages"):
        await stages.stop()
    assert log == ["start first", "stop first"]
    assert any("stopping broken failed" in r.getMessage() for r in caplog.records)


def test_stage_names_are_unique():
    with pytest.raises(ValueError, match="unique"):
        Stages([Stage("a"), Stage("a")])


def test_the_daemons_stages_take_their_timeouts_from_the_budget_table():
    settings = load_settings(None, environ={"UNSECURED": "true", "METRICS_PORT": "9188"})
    daemon = Daemon(settings, environ={})
    table = stop_timeouts(settings)
    used = daemon.stages.stages
    # Every stage the daemon runs is in the table, with the table's timeout; the table has no
    # stage the daemon could not run, so the budget is the daemon's worst case.
    assert {s.name: s.stop_timeout for s in used} == \
        {s.name: table[s.name][0] for s in used}
    assert budget(used) <= stop_budget(settings)
    optional = {"provisioning", "gpu", "autoscaler"}
    assert set(table) == {s.name for s in used} | optional
    # Stop order is the reverse of the start order: the drain first, systemd's last word last.
    assert [s.name for s in used][::-1][:2] == ["drain", "requests"]
    assert used[0].name == "systemd"


def test_the_drain_timeout_is_part_of_the_budget():
    short = stop_budget(load_settings(None, environ={"WORKER_DRAIN_TIMEOUT": "5"}))
    long = stop_budget(load_settings(None, environ={"WORKER_DRAIN_TIMEOUT": "35"}))
    assert long - short == pytest.approx(30)
