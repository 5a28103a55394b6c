"""The long run, bounded: 1,200 requests through the whole worker with 1 MB outputs
(`python -m tests.perf.endurance`, the same script `make endurance` runs at 30,000).

What a user would notice on a node that runs for months: every request succeeds, the output
folder stays within its cap, nothing is left in the input folder or the webhook spool, and the
daemon's and the wrapper's open files, tasks and memory do not follow the number of requests.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.support.procs import ROOT, base_env, run

REQUESTS, WARMUP, CAP_GB = 1200, 300, 0.2


@pytest.mark.e2e  # the script starts the whole worker
@pytest.mark.slow
def test_a_bounded_long_run_keeps_everything_flat():
    result = run([sys.executable, "-m", "tests.perf.endurance", "--requests", str(REQUESTS),
                  "--warmup", str(WARMUP), "--every", "450", "--cap-gb", str(CAP_GB),
                  # The last snapshot after the idle keep-alive connections have closed (aiohttp
                  # keeps one 15 s): what is open then is held, not pooled for the next request.
                  "--settle", "17", "--json", "--time-limit", "600"],
                 cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["statuses"] == {"200": REQUESTS}
    assert report["webhooks_received"] == REQUESTS
    first, last = report["snapshots"][0], report["snapshots"][-1]
    assert last["served"] == REQUESTS and first["served"] == WARMUP
    # 900 MB went through the output folder; what is left is within the cap.
    assert last["output_mb"] <= CAP_GB * 1000 + 1, last
    assert last["input_files"] == 0 and last["spool_files"] <= 1, last
    for process in ("daemon", "wrapper"):
        a, b = first[process], last[process]
        assert b["fds"] <= a["fds"] + 4, (process, a, b)
        assert b["threads"] <= a["threads"] + 3, (process, a, b)
        assert a["tasks"] is not None and b["tasks"] <= a["tasks"] + 3, (process, a, b)
        # A leak of 10 kB a request would be 9 MB here.
        assert b["rss_mb"] - a["rss_mb"] < 8, (process, a, b)
