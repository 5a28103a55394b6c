"""The host's FIFO across instances, driven in-process with stand-in instances."""

from __future__ import annotations

import asyncio

import pytest

from supervisor.serving.routing import Aborted, NotServing, Router


class Spot:
    """An instance as the router sees it: a number, and whether it takes work."""

    def __init__(self, number: int, accepting: bool = True):
        self.number = number
        self.accepting = accepting


def router_with(*spots: Spot, **kwargs) -> Router:
    router = Router(max_waiting=8, **kwargs)
    for spot in spots:
        router.add(spot)
    return router


async def test_requests_spread_over_instances_before_doubling_up():
    router = router_with(Spot(0), Spot(1))
    release = asyncio.Event()
    ran: list[int] = []

    async def work(instance):
        ran.append(instance.number)
        await release.wait()
        return instance.number

    tasks = [asyncio.create_task(router.run(work, lambda: None)) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert ran == [0, 1, 0, 1] and router.waiting == 1   # depth 2 each, the fifth waits
    release.set()
    assert sorted(await asyncio.gather(*tasks)) == [0, 0, 0, 1, 1]


async def test_a_dead_instance_fails_its_running_request_and_moves_the_queued_one():
    zero, one = Spot(0), Spot(1)
    router = router_with(zero, one)
    gate = {0: asyncio.Event(), 1: asyncio.Event()}

    async def work(instance):
        await gate[instance.number].wait()
        return instance.number

    first = asyncio.create_task(router.run(work, lambda: None, "a"))
    await asyncio.sleep(0)
    one.accepting = False       # instance 1 busy elsewhere: both go to instance 0
    second = asyncio.create_task(router.run(work, lambda: None, "b"))
    await asyncio.sleep(0.05)
    assert router.load(0) == 2
    one.accepting = True
    zero.accepting = False      # instance 0 dies: "a" ran on it, "b" only waited there
    assert router.abort_running(zero, "ComfyUI died", "a", True)
    router.changed()
    gate[1].set()
    with pytest.raises(Aborted, match="ComfyUI died"):
        await first
    assert await second == 1


async def test_waiting_requests_are_turned_away_when_no_instance_serves():
    only = Spot(0)
    router = router_with(only)
    hold = asyncio.Event()

    async def work(instance):
        await hold.wait()

    running = [asyncio.create_task(router.run(work, lambda: None)) for _ in range(3)]
    await asyncio.sleep(0.05)
    only.accepting = False
    router.changed()
    with pytest.raises(NotServing):
        await running[2]
    hold.set()
    await asyncio.gather(*running[:2])


async def test_a_restart_is_waited_out():
    only = Spot(0, accepting=False)
    router = router_with(only, restarting=lambda: True, hold=5)

    async def work(instance):
        return "done"

    task = asyncio.create_task(router.run(work, lambda: None))
    await asyncio.sleep(0.05)
    assert not task.done()
    only.accepting = True
    router.changed()
    assert await task == "done"


# --- the estimated wait (the autoscaler's max_queue_time) ----------------------------------------
def test_the_estimated_wait_is_the_work_ahead_over_the_rate():
    from supervisor.serving.estimate import Lane, estimated_wait
    from supervisor.serving.routing import Handed

    idle = Handed((), None)
    assert estimated_wait([], 3, now=100.0) is None            # no benchmark figure: unknown
    assert estimated_wait([Lane(5.0, idle)], 0, now=100.0) == 0
    # One GPU, 5 s a request: the running one half done (2.5 s in), one behind it in the
    # wrapper, two waiting at the public port: 0.5 + 1 + 2 requests of work, 5 s each.
    busy = Handed((97.5, 98.0), None)
    assert estimated_wait([Lane(5.0, busy)], 2, now=100.0) == pytest.approx(17.5)
    # The one behind started only when the one before it ended (last_done_at), not when handed.
    after = Handed((90.0,), 99.0)
    assert estimated_wait([Lane(5.0, after)], 0, now=100.0) == pytest.approx(4.0)
    # A request past its figure counts as almost done, not as negative work.
    late = Handed((80.0,), None)
    assert estimated_wait([Lane(5.0, late)], 1, now=100.0) == pytest.approx(5.0)
    # Two GPUs share the line: twice the rate.
    assert estimated_wait([Lane(5.0, busy), Lane(5.0, idle)], 2, now=100.0) == \
        pytest.approx(17.5 / 2)


async def test_the_router_says_what_each_instance_holds():
    router = router_with(Spot(0))
    release = asyncio.Event()

    async def work(instance):
        await release.wait()
        return instance.number

    first = asyncio.create_task(router.run(work, lambda: None))
    second = asyncio.create_task(router.run(work, lambda: None))
    await asyncio.sleep(0.05)
    held = router.handed(0)
    assert len(held.handed_at) == 2 and held.last_done_at is None
    release.set()
    await asyncio.gather(first, second)
    assert router.handed(0).handed_at == () and router.handed(0).last_done_at is not None
