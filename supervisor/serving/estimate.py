"""How long a new request would wait before its turn: the work ahead over the rate of work.

Each instance that takes work brings its seconds per request (its benchmark's figure) and what
it holds (`Router.handed`): the request it runs counts for the part not done yet (its elapsed
time against the benchmark's figure: the running request's progress), each one behind it for a
whole request. The requests waiting in the router's line count whole. The wait is that work, in
requests, over the instances' summed rate (requests per second).

The vastai SDK's estimate (`ModelMetrics.wait_time`) counts every request in flight whole and
divides by the benchmark's throughput; this one differs only by the running request's progress.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from supervisor.serving.routing import Handed


@dataclass(frozen=True)
class Lane:
    """One instance that takes work: its seconds per request and what it holds now."""

    seconds_per_request: float
    handed: Handed


def estimated_wait(lanes: Sequence[Lane], waiting: int, now: float) -> float | None:
    """Seconds a request arriving `now` (monotonic) waits before it runs; None without a figure."""
    lanes = [lane for lane in lanes if lane.seconds_per_request > 0]
    if not lanes:
        return None
    work = float(waiting)
    for lane in lanes:
        held = lane.handed.handed_at
        if not held:
            continue
        # The oldest runs; it began when it was handed over, or when the one before it ended.
        began = max(held[0], lane.handed.last_done_at or held[0])
        done = min(max(now - began, 0.0) / lane.seconds_per_request, 1.0)
        work += (1.0 - done) + (len(held) - 1)
    rate = sum(1.0 / lane.seconds_per_request for lane in lanes)
    return work / rate
