"""The start-up benchmark in tests: the settings that run it against the simulator, and waiting
for its verdict."""

from __future__ import annotations

from tests.support.net import wait_until
from tests.support.procs import get_json

STEPS, STEP_SECONDS = 20, 0.1
NOMINAL = STEPS * STEP_SECONDS  # what the simulator takes at slow factor 1


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
