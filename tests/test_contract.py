"""Contract tests from the API documents: Schemathesis against the running wrapper and the public
port (the whole worker, simulator as ComfyUI).

Schemathesis reads each server's /openapi.json, generates requests from it (valid ones, and ones
the document forbids), and checks every answer: no 500, a documented status code, a documented
content type and headers, a body that matches the documented schema; forbidden bodies refused
with a 4xx; a valid body never refused by the wrapper's own validation (tests/support/contract_hooks.py);
unsupported methods answered 405; the token really required on the public port. Afterwards the
worker must still be ready, with the same processes, and still serve.

Seeded and bounded: `make test` runs the fuzzing and stateful phases with CONTRACT_EXAMPLES
(default 15) cases per operation; `make contract` runs every phase, the coverage phase included,
with more.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.testing import start_simulator
from tests.support import procs
from tests.support.procs import (
    ROOT,
    base_env,
    get_json,
    post_json,
    start_daemon,
    start_wrapper,
)
from tests.support.workflows import OPERATOR_MODIFIER, TINY

TOKEN = "contract-t0ken"
EXAMPLES = os.environ.get("CONTRACT_EXAMPLES", "15")
PHASES = os.environ.get("CONTRACT_PHASES", "fuzzing,stateful")
SEED = os.environ.get("CONTRACT_SEED", "20261129")
TIMEOUT = float(os.environ.get("CONTRACT_TIMEOUT", "150"))  # seconds for one Schemathesis run
# Small limits keep each generated valid request quick. Every URL a generated body holds is
# pointed at 127.0.0.1:9 (contract_hooks), so loopback targets are allowed and webhooks are not
# retried: nothing leaves the machine, and nothing waits long.
LIMITS = {"API_MAX_DIMENSION": "64", "API_MAX_STEPS": "3", "API_REQUEST_TIMEOUT": "30",
          "API_INPUT_TIMEOUT": "2", "WEBHOOK_TIMEOUT": "2", "WEBHOOK_RETRIES": "0",
          "S3_ENDPOINT_URL": "http://127.0.0.1:9"}
LOOPBACK_ALLOWED = {"WEBHOOK_ALLOW_PRIVATE_TARGETS": "true", "API_ALLOW_PRIVATE_INPUTS": "true"}
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def schemathesis(url: str, *extra: str) -> subprocess.CompletedProcess:
    command = [str(SCHEMATHESIS), "--no-color", "--config-file",
               str(ROOT / "tests" / "schemathesis.toml"), "run", f"{url}/openapi.json",
               "--checks", "all", "--max-examples", EXAMPLES, "--seed", SEED,
               "--phases", PHASES, "--workers", "1", "--generation-database", "none",
               "--request-timeout", "60", "--max-failures", "20", *extra]
    env = {**base_env(), "SCHEMATHESIS_HOOKS": "tests.support.contract_hooks", "PYTHONPATH": str(ROOT)}
    return procs.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=TIMEOUT)


def assert_passed(run: subprocess.CompletedProcess) -> None:
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-15000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", report)
    assert counts and counts[1] == counts[2] and int(counts[1]) > 0, report[-5000:]
    print(f"schemathesis: {counts[0]} ({PHASES}, at most {EXAMPLES} per operation, "
          f"seed {SEED})")


def assert_no_bug_logged(*logs: str) -> None:
    """Our own handlers log a bug with these words (aiohttp also logs the 400s it answers
    itself for requests it cannot parse, such as Schemathesis's NUL-byte header probe)."""
    for log in logs:
        for words in ("bug in the", "unexpected error", "collecting outputs failed"):
            assert words not in log, log[-5000:]


# --- the wrapper -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wrapper(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract-wrapper")
    with start_simulator(tmp, "--step-seconds", "0.001") as sim:
        # (start_wrapper allows loopback targets itself)
        with start_wrapper(tmp, sim.url, sim.output_dir, **LIMITS) as running:
            yield running


@pytest.mark.real_processes
@pytest.mark.slow
def test_wrapper_keeps_its_documented_contract(wrapper):
    assert_passed(schemathesis(wrapper.url))
    assert wrapper.process.poll() is None
    assert get_json(wrapper.url + "/health")[0] == 200
    status, body = post_json(wrapper.url + "/generate/sync", {"input": {"workflow_json": TINY}})
    assert status == 200 and body["status"] == "completed", body
    assert_no_bug_logged(wrapper.log())


# --- the public port -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract-worker")
    modifiers = tmp / "modifiers"        # an operator's own modifier is generated for too
    modifiers.mkdir()
    (modifiers / "Blank.json").write_text(json.dumps(OPERATOR_MODIFIER))
    env = {**LIMITS, **LOOPBACK_ALLOWED, "WORKER_DOCS_PUBLIC": "true",
           "API_MODIFIERS_DIR": str(modifiers)}
    with start_daemon(tmp, "--step-seconds", "0.001", token=TOKEN, extra_env=env) as running:
        running.pids = pids(running)
        yield running


def pids(worker) -> tuple[int, int | None, int | None]:
    return (worker.process.pid, worker.child_pid("comfyui"), worker.child_pid("wrapper"))


@pytest.mark.e2e
def test_public_port_documents_only_its_own_routes(worker):
    status, document = get_json(worker.url + "/openapi.json")   # docs_public: no token
    assert status == 200
    assert set(document["paths"]) == {"/generate/sync", "/health", "/health/live",
                                      "/openapi.json", "/docs", "/docs/{asset}"}
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    # the daemon reads the modifiers as the wrapper does: the operator's is documented here too
    width = document["components"]["schemas"]["Modifications_Blank"]["properties"]["width"]
    assert width["maximum"] == 64                                   # API_MAX_DIMENSION


@pytest.mark.e2e
def test_public_port_keeps_its_documented_contract(worker):
    assert_passed(schemathesis(worker.url, "--header", f"Authorization: Bearer {TOKEN}"))
    assert worker.process.poll() is None
    assert pids(worker) == worker.pids, "a process was restarted"
    assert get_json(worker.url + "/health")[0] == 200
    status, body = worker.generate({"input": {"workflow_json": TINY}})
    assert status == 200 and body["status"] == "completed", body
    logs = [worker.log()] + [p.read_text(errors="replace")
                             for p in (worker.log_path.parent / "logs").glob("*.log")]
    assert_no_bug_logged(*logs)
