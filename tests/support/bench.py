"""The start-up benchmark in tests: the settings that run it against the simulator, waiting for its
verdict, and a full-speed reference measured on this machine now."""

from __future__ import annotations

from pathlib import Path

from tests.support.net import wait_until
from tests.support.procs import get_json, start_daemon

STEPS, STEP_SECONDS = 20, 0.1
NOMINAL = STEPS * STEP_SECONDS  # what the simulator takes at slow factor 1


#: For tests where the speed is not what is under test: no figure to compare with (and no GPU for a
#: reference table), so the benchmark runs, checks its image and measures, and its verdict is
#: no_reference. A fixed expectation cannot know how busy the shared machine is: 20 % of a 0.2 s
#: run is one scheduler hiccup.
NOT_JUDGED = {"BENCHMARK_EXPECTED_SECONDS": "0"}


def bench_env(**extra: str) -> dict[str, str]:
    """Settings for one small benchmark run (64×64, STEPS steps) expected to take NOMINAL s."""
    return {"BENCHMARK_ENABLED": "true", "BENCHMARK_TEST_WIDTH": "64",
            "BENCHMARK_TEST_HEIGHT": "64", "BENCHMARK_TEST_STEPS": str(STEPS),
            "BENCHMARK_RUNS": "1", "BENCHMARK_EXPECTED_SECONDS": str(NOMINAL), **extra}


def settled(worker):
    """/health's (status, body) once the worker has left start-up and the benchmark has a verdict."""
    def check():
        status, body = get_json(worker.url + "/health")
        if body.get("state") in ("ready", "degraded", "unhealthy") and \
                worker.status()["benchmark"]["status"] != "pending":
            return status, body
        return None
    return wait_until(check, 60, "the benchmark verdict")


def full_speed(tmp_path: Path) -> dict:
    """The benchmark's report on this machine now, with the simulator at full speed (slow factor
    1) and nothing to compare with: the reference for a test that judges a small slowdown, which
    a fixed figure cannot be where the load comes and goes (a busy machine oversleeps each step)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    with start_daemon(tmp_path, "--step-seconds", str(STEP_SECONDS), wait_ready=False,
                      extra_env=bench_env(**NOT_JUDGED)) as worker:
        settled(worker)
        return worker.status()["benchmark"]
