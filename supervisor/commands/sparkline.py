"""Terminal sparklines: a series of readings as one line of block characters.

Presentation only; `comfy-worker health --watch` draws the GPU history of the daemon's snapshot
with it, so a throttling pattern (temperature climbing to the slowdown line while the SM clock
steps down) is seen at a glance rather than read from numbers.
"""

from __future__ import annotations

from typing import Sequence

BLOCKS = "▁▂▃▄▅▆▇█"
GAP = " "  # a reading that was missing


def sparkline(values: Sequence[float | None], low: float, high: float) -> str:
    """One character per value, scaled between `low` and `high` (clamped to them)."""
    if high <= low:
        high = low + 1.0
    out = []
    for value in values:
        if value is None:
            out.append(GAP)
            continue
        share = (min(max(value, low), high) - low) / (high - low)
        out.append(BLOCKS[min(len(BLOCKS) - 1, int(share * len(BLOCKS)))])
    return "".join(out)
