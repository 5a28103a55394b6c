"""The worker as the vastai SDK (1.9.1) sees it: its own client routes through a stand-in
autoscaler to the demo worker, and what the worker reports is checked against the SDK's rules.

The stand-in (tests/support/fake_autoscaler.py) serves /pubkey/ and /route/, signs as the SDK's
worker verifies, records /worker_status/ and /delete_requests/, and routes to a worker only once
its report says it is ready. The SDK's client is used as an operator's program uses it
(`CoroutineServerless` + `Endpoint.request` / `Endpoint.session`); only its TLS context is given
to it, so that it does not download Vast's CA (this machine has no network).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import ssl
import statistics
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from vastai.serverless.client.client import CoroutineServerless
from vastai.serverless.client.endpoint import Endpoint

from supervisor.reporting.admin import admin_request
from tests.support.bench import NOT_JUDGED
from tests.support.fake_autoscaler import (
    MASTER_TOKEN,
    FakeAutoscaler,
    ThreadedAutoscaler,
    autoscaler_env,
)
from tests.support.procs import free_port, http_status, start_worker, wait_until

pytestmark = pytest.mark.e2e

WORKLOAD = 100.0          # autoscaler.workload's default, the SDK's DEFAULT_WORKLOAD
STEP = 0.05               # simulator seconds per sampler step
STEPS = 10                # one request: about STEPS x STEP seconds


def t2i(steps: int = STEPS) -> dict[str, Any]:
    return {"input": {"modifier": "Text2Image", "modifications": {
        "prompt": "a lighthouse", "width": 64, "height": 64, "steps": steps}}}


def bench_env(**extra: Any) -> dict[str, Any]:
    return {"BENCHMARK_ENABLED": "true", "BENCHMARK_TEST_WIDTH": "64",
            "BENCHMARK_TEST_HEIGHT": "64", "BENCHMARK_TEST_STEPS": str(STEPS),
            "BENCHMARK_RUNS": "1", **NOT_JUDGED,  # speed is not what these tests are about
            "AUTOSCALER_REPORT_INTERVAL": "2", **extra}


@contextlib.asynccontextmanager
async def sdk_endpoint(standin: FakeAutoscaler, cafile: Path | None = None
                       ) -> AsyncIterator[Endpoint]:
    client = CoroutineServerless(api_key="test-account-key", autoscaler_url=standin.url)
    client._ssl_context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    async with client:
        yield Endpoint(client, name="comfy-test", id=1, api_key="endpoint-key")


def ready_reports(standin: FakeAutoscaler) -> list[dict[str, Any]]:
    return [r for r in list(standin.statuses) if r["loadtime"]]


def finished_for(standin: FakeAutoscaler, idx: int) -> list[dict[str, Any]]:
    return [item for item in standin.finished() if item["request_idx"] == idx]


async def until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# --- the demo worker behind the stand-in ---------------------------------------------------------
@pytest.fixture(scope="module")
def scaler():
    threaded = ThreadedAutoscaler()
    try:
        yield threaded
    finally:
        threaded.close()


@pytest.fixture(scope="module")
def standin(scaler) -> FakeAutoscaler:
    fake = scaler.new(route_when_ready=True)
    fake.pubkey_ready = False      # held back until the worker serves: see the fixture below
    return fake


@pytest.fixture(scope="module")
def worker(tmp_path_factory, standin):
    tmp = tmp_path_factory.mktemp("vast-sdk")
    port = free_port()
    env = {**autoscaler_env(standin.url, port), **bench_env()}
    with start_worker(tmp, "--step-seconds", str(STEP), port=port, env=env,
                      wait_ready=False) as running:
        # It serves (benchmark done) but cannot verify a signature yet: not ready to the
        # autoscaler, however long that lasts.
        wait_until(lambda: http_status(running.url + "/health") == 200, 120, "the worker to serve")
        time.sleep(3)
        running.served_before_key = list(standin.statuses)
        standin.pubkey_ready = True
        wait_until(lambda: ready_reports(standin), 90, "a ready report after the key")
        yield running


def test_nothing_is_routed_before_the_key_arrives(worker, standin):
    before = worker.served_before_key
    assert before, "no report while the key was held back"
    assert all(r["loadtime"] == 0 and r["max_perf"] == 0 for r in before), before
    first = ready_reports(standin)[0]
    assert first["_at"] >= standin.pubkey_served_at[0]
    # The stand-in routes only to a ready worker, so no routed request met a 401.
    assert first["max_perf"] > 0 and first["error_msg"] == ""


async def test_a_steady_load_is_reported_in_one_unit(worker, standin):
    mark = len(standin.statuses)
    async with sdk_endpoint(standin) as endpoint:
        routed = len(standin.routed)
        for _ in range(4):
            result = await endpoint.request("/generate/sync", t2i(), timeout=60)
            assert result["ok"] and result["status"] == 200, result
            assert result["response"]["status"] == "completed"
    idxs = [a["request_idx"] for a in standin.routed[routed:]]
    await until(lambda: all(finished_for(standin, i) for i in idxs), 15, "the four finished")
    await until(lambda: len(standin.statuses) > mark + 2 and
                standin.statuses[-1]["cur_load"] == 0, 15, "reports after the traffic")
    window = list(standin.statuses[mark:])
    # One request at a time: never more than a couple of workloads in flight.
    assert max(r["cur_load"] for r in window) <= 2 * WORKLOAD
    assert sum(r["new_load"] for r in window) == 4 * WORKLOAD
    assert sum(r["cur_perf"] for r in window) == 4 * WORKLOAD
    for field in ("cur_load", "new_load", "cur_perf", "rej_load"):
        assert all(r[field] % WORKLOAD == 0 for r in window), field
    # max_perf is in the same unit: the workload over the seconds a request takes.
    seconds = statistics.mean(item["work_completed_at"] - item["work_started_at"]
                              for i in idxs for item in finished_for(standin, i))
    ratio = window[-1]["max_perf"] * seconds / WORKLOAD
    assert 0.5 < ratio < 2.0, (window[-1]["max_perf"], seconds)


async def test_concurrent_requests_are_each_finished_once(worker, standin):
    before = standin.statuses[-1]["num_requests_recieved"]
    async with sdk_endpoint(standin) as endpoint:
        routed = len(standin.routed)
        results = await asyncio.gather(*(endpoint.request("/generate/sync", t2i(), timeout=90)
                                         for _ in range(6)))
    assert [r["status"] for r in results] == [200] * 6
    idxs = {a["request_idx"] for a in standin.routed[routed:]}
    assert len(idxs) == 6
    await until(lambda: all(finished_for(standin, i) for i in idxs), 15, "six finished")
    for idx in idxs:
        (item,) = finished_for(standin, idx)
        assert (item["status"], item["success"]) == ("Success", True)
        assert 0 < item["entered_queue_at"] <= item["work_started_at"] <= item["work_completed_at"]
    await until(lambda: standin.statuses[-1]["num_requests_recieved"] >= before + 6, 10,
                "the count of received requests")
    assert standin.statuses[-1]["num_requests_recieved"] == before + 6


async def test_a_client_that_leaves_is_reported_cancelled(worker, standin):
    async with sdk_endpoint(standin) as endpoint:
        routed = len(standin.routed)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(endpoint.request("/generate/sync", t2i(steps=80)), 1.5)
    (auth,) = standin.routed[routed:]
    entries = await until(lambda: finished_for(standin, auth["request_idx"]), 15,
                          "the cancelled request")
    assert len(entries) == 1
    assert (entries[0]["status"], entries[0]["success"]) == ("Cancelled", True)
    assert entries[0]["work_completed_at"] == 0


async def test_a_session_through_the_sdk(worker, standin):
    async with sdk_endpoint(standin) as endpoint:
        session = await endpoint.session(cost=100, lifetime=30)
        created = session.expiration
        result = await session.request("/generate/sync", t2i())
        assert result["status"] == 200, result
        idx = session.auth_data["request_idx"]
        open_report = await until(lambda: next(
            (r for r in list(standin.statuses) if idx in r["working_request_idxs"]), None),
            10, "a report holding the session")
        assert open_report["cur_load"] >= WORKLOAD
        async with aiohttp.ClientSession() as http:
            body = {"session_id": session.session_id, "session_auth": session.auth_data}
            async with http.post(worker.url + "/session/get", json=body) as answer:
                got = await answer.json()
            # One request in it: the session lives one lifetime longer.
            assert got["expiration"] == pytest.approx(created + 30)
            async with http.post(worker.url + "/session/health", json=body) as answer:
                assert await answer.json() == {"ok": True}
            wrong = {**body, "session_auth": {**session.auth_data, "reqnum": 0}}
            async with http.post(worker.url + "/session/get", json=wrong) as answer:
                assert answer.status == 401
            await session.close()
            async with http.post(worker.url + "/session/health", json=body) as answer:
                assert await answer.json() == {"ok": False}
            async with http.post(worker.url + "/session/end", json=body) as answer:
                assert answer.status == 400
            routed = {"auth_data": session.auth_data, "session_id": session.session_id,
                      "payload": t2i()}
            async with http.post(worker.url + "/generate/sync", json=routed) as answer:
                assert (answer.status, await answer.json()) == (410, {"error": "invalid session"})
    (closed,) = await until(lambda: finished_for(standin, idx), 10, "the session's end")
    assert (closed["status"], closed["success"]) == ("Success", True)


def test_loadtime_is_in_every_report_after_ready(worker, standin):
    statuses = list(standin.statuses)
    first = next(i for i, r in enumerate(statuses) if r["loadtime"])
    assert {r["loadtime"] for r in statuses[first:]} == {statuses[first]["loadtime"]}
    assert all(r["error_msg"] == "" for r in statuses)
    assert all("disk_usage" in r and r["version"] == "1.1.0" for r in statuses)


def test_a_restart_of_comfyui_is_no_error(worker, standin):
    mark = len(standin.statuses)
    answer = asyncio.run(admin_request(worker.admin_socket, "POST", "/restart/comfyui"))
    assert answer["ok"], answer
    wait_until(lambda: any(r["max_perf"] == 0 for r in standin.statuses[mark:]), 20,
               "a report without capacity while ComfyUI restarts")
    wait_until(lambda: http_status(worker.url + "/health") == 200, 60, "serving again")
    wait_until(lambda: standin.statuses[-1]["max_perf"] > 0, 20, "capacity back")
    window = list(standin.statuses[mark:])
    # A restart heals by itself: load and capacity say it, error_msg does not.
    assert all(r["error_msg"] == "" for r in window), [r["error_msg"] for r in window]
    assert all(r["loadtime"] == window[0]["loadtime"] > 0 for r in window)


# --- what does not heal --------------------------------------------------------------------------
def test_a_crash_loop_that_gives_up_is_an_error_msg(tmp_path, scaler):
    standin = scaler.new(route_when_ready=True)
    port = free_port()
    env = {**autoscaler_env(standin.url, port), "AUTOSCALER_REPORT_INTERVAL": "1",
           "COMFYUI_COMMAND": json.dumps([sys.executable, "-c",
                                           "import sys; sys.exit('no GPU')"]),
           "SUPERVISOR_CRASH_LOOP_COUNT": "3"}
    with start_worker(tmp_path, port=port, env=env, wait_ready=False):
        failed = wait_until(lambda: next((r for r in list(standin.statuses)
                                          if r["error_msg"]), None), 60, "an error_msg")
    assert failed["error_msg"].startswith("ComfyUI failed: "), failed["error_msg"]
    before = standin.statuses[:standin.statuses.index(failed)]
    assert before and all(r["error_msg"] == "" for r in before)   # restarting is no error
    assert failed["loadtime"] == 0 and failed["max_perf"] == 0


# --- TLS at the instance paths, the estimated wait, updates ---------------------------------------
def instance_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 where a test says Vast puts its own."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    crt, pem = folder / "instance.crt", folder / "instance.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


@pytest.fixture(scope="module")
def tls(tmp_path_factory, scaler):
    tmp = tmp_path_factory.mktemp("vast-tls")
    crt, pem = instance_certificate(tmp / "etc")
    standin = scaler.new(route_when_ready=True)
    port = free_port()
    env = {**autoscaler_env(standin.url, port), **bench_env(), "USE_SSL": "true",
           "AUTOSCALER_INSTANCE_CERT": str(crt), "AUTOSCALER_INSTANCE_KEY": str(pem),
           "AUTOSCALER_MAX_QUEUE_TIME": "1"}
    with start_worker(tmp, "--step-seconds", str(STEP), port=port, env=env,
                      wait_ready=False) as running:
        wait_until(lambda: ready_reports(standin) or running.process.poll() is not None, 120,
                   "a ready report over TLS")
        assert running.process.poll() is None, running.log()
        running.url = running.url.replace("http://", "https://")
        yield running, standin, crt


async def test_tls_with_the_instance_certificate(tls):
    worker, standin, crt = tls
    assert ready_reports(standin)[0]["url"] == worker.url      # https, as the SDK reports it
    async with sdk_endpoint(standin, cafile=crt) as endpoint:
        result = await endpoint.request("/generate/sync", t2i(), timeout=60)
    assert result["status"] == 200 and result["url"] == worker.url


async def test_an_estimated_wait_over_max_queue_time_is_refused_with_429(tls):
    worker, standin, crt = tls
    context = ssl.create_default_context(cafile=str(crt))
    auths = [standin.make_auth_data() for _ in range(8)]
    async with aiohttp.ClientSession() as http:
        async def post(auth):
            body = {"auth_data": auth, "session_id": None, "payload": t2i()}
            async with http.post(worker.url + "/generate/sync", json=body,
                                 ssl=context) as answer:
                return answer.status, answer.headers.get("Retry-After"), await answer.json()

        answers = await asyncio.gather(*(post(a) for a in auths))
    statuses = [status for status, _, _ in answers]
    assert 200 in statuses and 429 in statuses, statuses
    refused = [(auth, retry, body) for auth, (status, retry, body) in zip(auths, answers)
               if status == 429]
    for auth, retry, body in refused:
        assert int(retry) >= 1 and "max_queue_time 1 s" in body["error"], body
    for auth, _, _ in refused:
        (item,) = await until(lambda: finished_for(standin, auth["request_idx"]), 10,
                              "the refused request")
        assert (item["status"], item["success"], item["work_started_at"]) == \
            ("Rejected", False, 0)
    await until(lambda: sum(r["rej_load"] for r in standin.statuses) >=
                len(refused) * WORKLOAD, 10, "the rejected load")
    assert sum(r["rej_load"] for r in standin.statuses) == len(refused) * WORKLOAD


async def test_pyworker_update_needs_the_master_token_then_drains_and_exits(tls):
    worker, standin, crt = tls
    context = ssl.create_default_context(cafile=str(crt))
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer not-the-token"}):
            async with http.post(worker.url + "/pyworker/update", headers=headers,
                                 ssl=context) as answer:
                assert (answer.status, await answer.json()) == (401, {"error": "unauthorized"})
        assert worker.process.poll() is None

        auth = standin.make_auth_data()
        body = {"auth_data": auth, "session_id": None, "payload": t2i(40)}
        running = asyncio.ensure_future(http.post(worker.url + "/generate/sync", json=body,
                                                  ssl=context))
        await until(lambda: any(auth["request_idx"] in r["working_request_idxs"]
                                for r in list(standin.statuses)), 10, "the request in flight")
        headers = {"Authorization": f"Bearer {MASTER_TOKEN}"}
        async with http.post(worker.url + "/pyworker/update", headers=headers,
                             ssl=context) as answer:
            assert answer.status == 200 and (await answer.json())["ok"] is True
        finished = await running
        assert finished.status == 200        # what ran was finished first
        finished.release()
    code = await asyncio.to_thread(worker.process.wait, 30)
    assert code == 75, worker.log()          # for the service manager to start it again


def test_a_missing_instance_certificate_stops_the_start_naming_it(tmp_path, scaler):
    standin = scaler.new()
    port = free_port()
    missing = tmp_path / "nowhere" / "instance.crt"
    env = {**autoscaler_env(standin.url, port), "USE_SSL": "true",
           "AUTOSCALER_INSTANCE_CERT": str(missing),
           "AUTOSCALER_INSTANCE_KEY": str(tmp_path / "nowhere" / "instance.key")}
    with start_worker(tmp_path, port=port, env=env, wait_ready=False) as worker:
        code = worker.process.wait(60)
        log = worker.log()
    assert code == 1, log
    line = next(line for line in log.splitlines() if str(missing) in line)
    for name in ("AUTOSCALER_INSTANCE_CERT", "WORKER_SSL_CERT", "USE_SSL=false"):
        assert name in line, line
    assert "Traceback" not in log
    # The autoscaler hears why, as the SDK's start-up beacon tells it.
    assert any(str(missing) in r["error_msg"] for r in standin.statuses)
