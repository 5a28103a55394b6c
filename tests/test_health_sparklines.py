"""`comfy-worker health --watch` draws the GPUs' last minutes as sparklines.

A GPU read from a fake NVML file warms from 40 °C to its slowdown temperature while its SM clock
steps down; the watch, run as a real process against the real daemon, shows the temperature line
rising to the top block, the clock line falling, and the lines each is judged against.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor.commands.report import HealthReport, render_table
from supervisor.commands.sparkline import BLOCKS, sparkline
from tests.support import procs
from tests.support.procs import ROOT, base_env, start_daemon, wait_until

ENTRY = "from supervisor.commands.health_cli import health; health()"


def test_sparkline_scales_between_its_bounds_and_shows_gaps():
    assert sparkline([0, 50, 100], 0, 100) == BLOCKS[0] + BLOCKS[4] + BLOCKS[-1]
    assert sparkline([-5, None, 500], 0, 100) == BLOCKS[0] + " " + BLOCKS[-1]
    assert sparkline([3, 3], 3, 3) == BLOCKS[0] * 2  # a flat line does not divide by zero


def test_history_is_drawn_only_when_asked():
    status = {"worker": {"state": "ready", "reason": "ok"}, "gpu": {
        "verdict": {"level": "ok"}, "snapshot": {"gpus": []},
        "history": {"0": {"age_s": [120, 60, 0], "temperature_c": [40, 70, 90],
                          "power_w": [100, 400, 700], "sm_clock_mhz": [1980, 1700, 1350],
                          "slowdown_c": 90, "power_limit_w": 700, "sm_clock_max_mhz": 1980}}}}
    report = HealthReport.from_daemon(status, "/x.sock")
    assert "GPU 0 history" not in render_table(report)
    text = render_table(report, history=True)
    assert "GPU 0 history (last 2m" in text or "GPU 0 history" in text
    temp = next(line for line in text.splitlines() if line.strip().startswith("temp"))
    assert temp.split()[1].endswith(BLOCKS[-1]) and "(slowdown 90)" in temp
    clock = next(line for line in text.splitlines() if line.strip().startswith("SM"))
    assert clock.split()[1][0] == BLOCKS[-1] and clock.split()[1][-1] < BLOCKS[-1]


def write_gpus(path: Path, temperature: int, sm_clock: int) -> None:
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps({"gpus": [{"preset": "h100_sxm", "temperature_c": temperature,
                                             "sm_clock_mhz": sm_clock, "gpu_util_pct": 100}]}))
    os.replace(scratch, path)


@pytest.mark.e2e
def test_watch_draws_a_gpu_warming_to_its_slowdown_line(tmp_path):
    fake = tmp_path / "gpus.json"
    write_gpus(fake, 40, 1980)
    env = {"GPU_FAKE_SOURCE": str(fake), "GPU_SAMPLE_INTERVAL": "0.1",
           "GPU_TEMP_MARGIN_C": "0"}
    with start_daemon(tmp_path, extra_env=env) as worker:
        for temperature, clock in ((50, 1980), (60, 1900), (70, 1800), (80, 1600), (89, 1400)):
            time.sleep(0.4)
            write_gpus(fake, temperature, clock)
        time.sleep(0.4)
        out_path = tmp_path / "watch.out"
        with open(out_path, "w") as out_file:
            process = procs.popen(
                [sys.executable, "-c", ENTRY, "--socket", str(worker.admin_socket),
                 "--watch", "0.3"], cwd=ROOT, env=base_env(), stdout=out_file,
                stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: "GPU 0 history" in out_path.read_text(), 20, "the history")
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
    frame = out_path.read_text().split("every 0.3 s")[1]
    temp = next(line for line in frame.splitlines() if line.strip().startswith("temp"))
    clock = next(line for line in frame.splitlines() if line.strip().startswith("SM"))
    spark = temp.split()[1]
    assert len(spark) >= 10, temp
    # Rising (the scale runs from 20 °C to the slowdown line): it starts low and ends at the top
    # block, each step no lower than the one before.
    assert spark[0] <= BLOCKS[2] and spark[-1] == BLOCKS[-1], temp
    assert list(spark) == sorted(spark), temp
    assert "now 89 °C (slowdown 90)" in temp
    assert clock.split()[1][0] == BLOCKS[-1] and clock.split()[1][-1] < BLOCKS[-2], clock
    assert "now 1400 MHz (max 1980)" in clock
