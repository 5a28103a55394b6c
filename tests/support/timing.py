"""How busy this machine is right now, measured, for tests that judge time.

The suite runs on two cores that other test runs share: a bound that holds on an idle machine
breaks on a busy one, and a number picked to cover "busy" hides real slowness on an idle one.
So the bound is scaled by a measurement taken in the same run: `slowness()` spins for a few short
windows and sees what share of a core this process got while it wanted one (1.0 idle, about 0.25
when four runnable processes share each core); its inverse is how much longer than idle anything
that needs the CPU takes now.

* An upper bound on a duration is `allowance(seconds)`: the idle machine's bound times the
  slowness measured just now (never less than the bound itself).
* A wait with a deadline (`net.wait_until`) stretches by the same factor before it gives up, so a
  deadline only catches a hang.
* A lower bound needs nothing: a busy machine only makes things slower.
"""

from __future__ import annotations

import statistics
import time

WINDOW_S = 0.03  # one measurement window: a few scheduler slices
WINDOWS = 3


def cpu_share(window: float = WINDOW_S) -> float:
    """The share of one core this thread got while spinning for `window` seconds of wall time."""
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    while time.perf_counter() - wall0 < window:
        pass
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    return min(1.0, cpu / wall) if wall > 0 else 1.0


def slowness() -> float:
    """How many times longer than on an idle machine CPU work takes right now (at least 1)."""
    share = statistics.median(cpu_share() for _ in range(WINDOWS))
    return max(1.0, 1.0 / max(share, 0.02))


def allowance(seconds: float) -> float:
    """An upper bound of `seconds` on an idle machine, scaled to how busy it is now."""
    return seconds * slowness()
