"""The real daemon behind the fake autoscaler: signatures, reports, finished requests, outages.

One worker runs for the whole module (REPORT_ADDR points at the fake; no WORKER_AUTH_TOKEN, no
UNSECURED), the fake autoscaler runs in a thread with its own event loop so the tests can stay
synchronous and the worker can report to it between tests.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from supervisor.commands.client_cli import client
from tests.support.fake_autoscaler import (
    CONTAINER_ID,
    MASTER_TOKEN,
    FakeAutoscaler,
    Outage,
    ThreadedAutoscaler,
    autoscaler_env,
    new_private_key,
)
from tests.support.procs import (
    Daemon,
    free_port,
    http_status,
    post_json,
    start_worker,
    wait_until,
)
from tests.support.timing import allowance
from tests.support.workflows import TINY

WORKLOAD = 100   # autoscaler.workload's default: every load field counts in it


@pytest.fixture(scope="module")
def scaler():
    threaded = ThreadedAutoscaler()
    try:
        yield threaded
    finally:
        threaded.close()


@pytest.fixture(scope="module")
def fake(scaler) -> FakeAutoscaler:
    return scaler.new()


@pytest.fixture(scope="module")
def worker(tmp_path_factory, fake):
    tmp = tmp_path_factory.mktemp("autoscaled")
    port = free_port()
    with start_worker(tmp, "--step-seconds", "0.02", port=port,
                      env=autoscaler_env(fake.url, port)) as running:
        fake.worker_url = running.url
        # The key is fetched in the background; until it is, signed requests get 401.
        wait_until(lambda: signed(running, fake, TINY)[0] != 401, 15, "the key to be fetched")
        yield running


def signed(worker: Daemon, fake: FakeAutoscaler, workflow: dict, auth: dict | None = None,
           **auth_kwargs: Any) -> tuple[int, dict]:
    auth = auth if auth is not None else fake.make_auth_data(**auth_kwargs)
    return post_json(worker.url + "/generate/sync",
                     {"auth_data": auth, "payload": {"input": {"workflow_json": workflow}}})


def reports_after(fake: FakeAutoscaler, count: int = 2) -> int:
    """Index into fake.statuses after which every report reflects all earlier activity.

    A report built just before the last request finished may still arrive afterwards, so wait
    for `count` new reports (they come every second).
    """
    start = len(fake.statuses)
    wait_until(lambda: len(fake.statuses) >= start + count, 10, "fresh status reports")
    return len(fake.statuses)


def deleted(fake: FakeAutoscaler) -> dict[int, dict]:
    return {item["request_idx"]: {**item, "_batch": batch}
            for batch in list(fake.deletes) for item in batch["requests"]}


# --- signatures ----------------------------------------------------------------------------------
@pytest.mark.e2e
def test_signed_request_is_served(worker, fake):
    status, body = signed(worker, fake, TINY)
    assert status == 200, body
    assert body["status"] == "completed" and body["output"]


@pytest.mark.e2e
def test_bare_request_is_refused_with_the_expected_shape(worker):
    status, body = post_json(worker.url + "/generate/sync", {"input": {"workflow_json": TINY}})
    assert status == 401
    assert "missing auth_data" in body["error"] and "payload" in body["error"]


@pytest.mark.e2e
def test_signature_from_another_key_is_refused(worker, fake):
    stranger = FakeAutoscaler(key=new_private_key())
    status, body = signed(worker, fake, TINY, auth=stranger.make_auth_data(worker.url))
    assert (status, body["error"]) == (401, "invalid signature")


@pytest.mark.e2e
def test_tampered_url_is_refused(worker, fake):
    auth = fake.make_auth_data()
    auth["url"] = "http://127.0.0.1:1"
    status, body = signed(worker, fake, TINY, auth=auth)
    assert (status, body["error"]) == (401, "invalid signature")


@pytest.mark.e2e
def test_signature_for_another_worker_is_refused(worker, fake):
    status, body = signed(worker, fake, TINY, url="http://127.0.0.1:1")
    assert status == 401, body
    assert body["error"] == "request was signed for another worker"


@pytest.mark.parametrize("remove, reason", [
    (("signature", "reqnum"), "missing fields: reqnum, signature"),
    (("url",), "missing fields: url"),
])
@pytest.mark.e2e
def test_missing_auth_fields_are_a_422_naming_them(worker, fake, remove, reason):
    auth = {k: v for k, v in fake.make_auth_data().items() if k not in remove}
    status, body = signed(worker, fake, TINY, auth=auth)
    assert (status, body["error"]) == (422, reason)


@pytest.mark.e2e
def test_envelope_without_auth_data_or_payload_is_a_422(worker):
    status, body = post_json(worker.url + "/generate/sync",
                             {"payload": {"input": {"workflow_json": TINY}}})
    assert (status, body["error"]) == (422, "missing fields: auth_data")
    status, body = post_json(worker.url + "/generate/sync", {"auth_data": {}})
    assert (status, body["error"]) == (422, "missing fields: payload")


@pytest.mark.e2e
def test_replayed_request_is_refused(worker, fake):
    auth = fake.make_auth_data()
    first, _ = signed(worker, fake, TINY, auth=auth)
    again, body = signed(worker, fake, TINY, auth=auth)
    assert first == 200
    assert (again, body["error"]) == (401, "replayed request")


# --- reports -------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_reports_identify_the_worker_and_send_loadtime_in_every_report(worker, fake):
    reports_after(fake, 1)
    statuses = list(fake.statuses)
    for report in statuses:
        assert report["id"] == CONTAINER_ID and report["mtoken"] == MASTER_TOKEN
        assert report["url"] == f"http://127.0.0.1:{worker.port}"
        assert report["max_capacity"] == 0 and report["cur_capacity"] == 0
    # 0 until ready, then the same figure in every report (as the vastai SDK sends it).
    first = next(i for i, r in enumerate(statuses) if r["loadtime"])
    assert all(r["loadtime"] == 0 for r in statuses[:first])
    assert {r["loadtime"] for r in statuses[first:]} == {statuses[first]["loadtime"]}
    assert 0 < statuses[first]["loadtime"] < 60
    # The benchmark is off in this test: no invented throughput.
    assert statuses[-1]["max_perf"] == 0
    assert statuses[-1]["error_msg"] == ""


@pytest.mark.e2e
def test_reports_count_requests_and_finished_ones_are_deleted(worker, fake):
    mark = reports_after(fake)
    before = fake.statuses[mark - 1]["num_requests_recieved"]
    ok_idx = []
    for _ in range(3):
        auth = fake.make_auth_data()
        assert signed(worker, fake, TINY, auth=auth)[0] == 200
        ok_idx.append(auth["request_idx"])
    bad = fake.make_auth_data()
    status, body = signed(worker, fake, {"1": {"class_type": "NoSuchNode", "inputs": {}}},
                          auth=bad)
    assert status == 400, body

    def settled():
        window = fake.statuses[mark:]
        return window and sum(r["new_load"] for r in window) >= 4 * WORKLOAD and \
            window[-1]["num_requests_working"] == 0

    wait_until(settled, 10, "reports of the four requests")
    window = list(fake.statuses[mark:])
    assert sum(r["new_load"] for r in window) == 4 * WORKLOAD
    assert sum(r["cur_perf"] for r in window) == 3 * WORKLOAD  # the failed one is not served
    assert sum(r["rej_load"] for r in window) == 0
    last = window[-1]
    assert last["num_requests_recieved"] == before + 4
    assert last["cur_load"] == 0 and last["working_request_idxs"] == []

    wait_until(lambda: set(ok_idx + [bad["request_idx"]]) <= set(deleted(fake)), 10,
               "the finished requests at /delete_requests/")
    done = deleted(fake)
    for idx in ok_idx:
        item = done[idx]
        assert item["success"] is True and item["status"] == "Success"
        assert 0 < item["entered_queue_at"] <= item["work_started_at"] <= item["work_completed_at"]
        assert item["_batch"]["worker_id"] == CONTAINER_ID
        assert item["_batch"]["mtoken"] == MASTER_TOKEN
    assert done[bad["request_idx"]]["success"] is False
    assert done[bad["request_idx"]]["status"] == "Error"


@pytest.mark.e2e
def test_request_in_flight_is_reported_as_load(worker, fake):
    auth = fake.make_auth_data()
    slow = {"input": {"modifier": "Text2Image",
                      "modifications": {"steps": 100, "width": 64, "height": 64}}}
    answer: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: answer.update(
        result=post_json(worker.url + "/generate/sync", {"auth_data": auth, "payload": slow})))
    thread.start()
    try:
        busy = wait_until(lambda: next((r for r in list(fake.statuses)
                                        if auth["request_idx"] in r["working_request_idxs"]),
                                       None), 10, "a report with the request in flight")
    finally:
        thread.join(30)
    assert busy["cur_load"] == WORKLOAD and busy["num_requests_working"] == 1
    assert answer["result"][0] == 200, answer
    wait_until(lambda: auth["request_idx"] in deleted(fake), 10, "the request to be deleted")
    item = deleted(fake)[auth["request_idx"]]
    # 100 steps at 0.02 s: the work took time, and the timestamps say so.
    assert item["work_completed_at"] - item["work_started_at"] >= 1.5


@pytest.mark.e2e
@pytest.mark.parametrize("outage", [Outage.CLOSED, Outage.ERROR_503])
def test_serving_goes_on_while_the_autoscaler_is_down(worker, fake, scaler, outage):
    scaler.call(fake.go_down(outage))
    try:
        auths = [fake.make_auth_data() for _ in range(2)]
        for auth in auths:
            status, body = signed(worker, fake, TINY, auth=auth)
            assert status == 200, body
        assert not {a["request_idx"] for a in auths} & set(deleted(fake))
    finally:
        scaler.call(fake.come_up())
    # Nothing was lost while it was down: the finished requests arrive once it is back.
    wait_until(lambda: {a["request_idx"] for a in auths} <= set(deleted(fake)), 15,
               "the finished requests after the outage")
    assert http_status(worker.url + "/health") == 200


# --- start-up errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("drop", [("VAST_TCP_PORT",), ("VAST_TCP_PORT", "CONTAINER_ID",
                                                       "PUBLIC_IPADDR")])
@pytest.mark.e2e
def test_missing_host_variables_stop_the_start_with_one_message(tmp_path, fake, drop):
    port = free_port()
    env = autoscaler_env(fake.url, port)
    for name in drop:
        env[f"VAST_TCP_PORT_{port}" if name == "VAST_TCP_PORT" else name] = None
    with start_worker(tmp_path, port=port, env=env, wait_ready=False) as worker:
        code = worker.process.wait(30)
        log = worker.log()
    assert code == 2, log
    assert "Traceback" not in log
    expected = [f"VAST_TCP_PORT_{port}" if n == "VAST_TCP_PORT" else n for n in drop]
    lines = [line for line in log.splitlines() if all(n in line for n in expected)]
    assert len(lines) == 1, log
    assert "REPORT_ADDR" in lines[0]


# --- the client through the autoscaler -----------------------------------------------------------
def run_client(*args: str) -> Any:
    return CliRunner().invoke(client, list(args), catch_exceptions=False)


@pytest.mark.e2e
def test_client_generate_through_route(worker, fake, tmp_path):
    result = run_client("generate", "--autoscaler", fake.url, "--endpoint", "comfy-e2e",
                        "--api-key", "k-123", "--modifier", "Text2Image", "--set",
                        "prompt=a lighthouse", "--set", "width=64", "--set", "height=48",
                        "--set", "steps=2", "--out", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.stderr
    # The vastai SDK client's cost; the worker counts its own workload (autoscaler.workload).
    assert fake.routes[-1] == {"endpoint": "comfy-e2e", "api_key": "k-123", "cost": 100}
    (saved,) = (tmp_path / "out").iterdir()
    assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"saved {saved}" in result.stdout


@pytest.mark.e2e
def test_client_waits_while_the_autoscaler_has_no_worker(worker, scaler, tmp_path):
    waiting = scaler.new()  # same signing key as the worker trusts; no worker assigned yet
    threading.Timer(0.6, lambda: setattr(waiting, "worker_url", worker.url)).start()
    result = run_client("generate", "--autoscaler", waiting.url, "--endpoint", "e",
                        "--api-key", "k", "--workflow", str(write_tiny(tmp_path)), "-q")
    assert result.exit_code == 0, result.stderr
    assert len(waiting.routes) >= 2
    # It kept its place in line: later asks carry the request_idx of the first answer.
    assert waiting.routes[1]["request_idx"] == 1


def test_client_gives_up_when_no_worker_comes(scaler, tmp_path):
    waiting = scaler.new()
    began = time.monotonic()
    result = run_client("generate", "--autoscaler", waiting.url, "--endpoint", "e",
                        "--api-key", "k", "--workflow", str(write_tiny(tmp_path)),
                        "--timeout", "1", "-q")
    assert result.exit_code == 1
    assert "no worker became ready for endpoint 'e'" in result.stderr
    assert time.monotonic() - began < allowance(5)


def test_client_reports_a_refused_api_key(scaler, tmp_path):
    strict = scaler.new(api_key="right")
    result = run_client("generate", "--autoscaler", strict.url, "--endpoint", "e",
                        "--api-key", "wrong", "--workflow", str(write_tiny(tmp_path)), "-q")
    assert result.exit_code == 1
    assert "HTTP 401" in result.stderr and "invalid api_key" in result.stderr


@pytest.mark.e2e
def test_client_load_through_route(worker, fake, tmp_path):
    routed = len(fake.routes)
    result = run_client("load", "--autoscaler", fake.url, "--endpoint", "e", "--api-key", "k",
                        "--workflow", str(write_tiny(tmp_path)), "-n", "5", "--rps", "0",
                        "--concurrency", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status_counts"] == {"200": 5}
    assert len(fake.routes) - routed == 5       # one route (and signature) per request


@pytest.mark.e2e
def test_client_sends_the_cost_it_is_given(worker, fake, tmp_path):
    result = run_client("generate", "--autoscaler", fake.url, "--endpoint", "e", "--api-key",
                        "k", "--cost", "2.5", "--workflow", str(write_tiny(tmp_path)), "-q")
    assert result.exit_code == 0, result.stderr
    assert fake.routes[-1]["cost"] == 2.5


def write_tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path
