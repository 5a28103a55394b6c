"""The autoscaler side of the worker against a fake autoscaler on loopback (real HTTP)."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import psutil
import pytest
import pytest_asyncio

from supervisor.autoscaler import (
    AuthError,
    AutoscalerEnv,
    InvalidEnvironment,
    MissingEnvironment,
    PublicKeyFetcher,
    ReplayGuard,
    RequestAuthenticator,
    RequestOutcome,
    StatusReporter,
    load_public_key,
    parse_envelope,
    verify,
)
from supervisor.autoscaler.failures import FailureLog
from tests.support.fake_autoscaler import (
    FakeAutoscaler,
    Outage,
    canonical,
    new_private_key,
    public_pem,
    sign,
)
from tests.support.net import free_port
from tests.support.timing import allowance

WORKER_URL = "http://203.0.113.7:41234"

# The report fields the autoscaler reads, exactly as spelled by the protocol.
STATUS_FIELDS = {
    "id", "mtoken", "version", "loadtime", "cur_load", "rej_load", "new_load", "error_msg",
    "max_perf", "cur_perf", "cur_capacity", "max_capacity", "num_requests_working",
    "num_requests_recieved", "additional_disk_usage", "disk_usage", "working_request_idxs",
    "url",
}


@pytest_asyncio.fixture
async def session():
    async with aiohttp.ClientSession() as client:
        yield client


def make_env(*addrs: str) -> AutoscalerEnv:
    return AutoscalerEnv(
        report_addrs=tuple(addrs),
        container_id=42,
        master_token="master-token",
        public_ip="203.0.113.7",
        public_port=41234,
        worker_port=3000,
    )


def make_reporter(session, *addrs: str, **kwargs) -> StatusReporter:
    kwargs.setdefault("timeout", 1.0)
    kwargs.setdefault("disk_path", None)
    return StatusReporter(make_env(*addrs), session, **kwargs)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# --------------------------------------------------------------------------- environment

FULL_ENV = {
    "REPORT_ADDR": " https://a.example/ , https://b.example ",
    "CONTAINER_ID": "1234",
    "MASTER_TOKEN": "tok",
    "PUBLIC_IPADDR": "198.51.100.4",
    "VAST_TCP_PORT_3000": "40001",
}


def test_env_is_none_without_report_addr():
    assert AutoscalerEnv.from_environ({}, 3000) is None
    assert AutoscalerEnv.from_environ({"REPORT_ADDR": "  ", "CONTAINER_ID": "1"}, 3000) is None


def test_env_reads_addresses_ids_and_public_url():
    env = AutoscalerEnv.from_environ(FULL_ENV, 3000)
    assert env is not None
    assert env.report_addrs == ("https://a.example", "https://b.example")
    assert env.container_id == 1234
    assert env.master_token == "tok"
    assert env.public_url == "http://198.51.100.4:40001"
    assert not env.unsecured

    secure = AutoscalerEnv.from_environ({**FULL_ENV, "USE_SSL": "true", "UNSECURED": "1"}, 3000)
    assert secure is not None
    assert secure.public_url == "https://198.51.100.4:40001"
    assert secure.unsecured


def test_env_port_variable_follows_worker_port():
    environ = {**FULL_ENV, "VAST_TCP_PORT_8188": "40002"}
    del environ["VAST_TCP_PORT_3000"]
    env = AutoscalerEnv.from_environ(environ, 8188)
    assert env is not None and env.public_url.endswith(":40002")


def test_missing_environment_names_every_missing_variable():
    with pytest.raises(MissingEnvironment) as info:
        AutoscalerEnv.from_environ({"REPORT_ADDR": "https://a.example", "PUBLIC_IPADDR": ""}, 3000)
    message = str(info.value)
    for name in ("CONTAINER_ID", "PUBLIC_IPADDR", "VAST_TCP_PORT_3000"):
        assert name in message
    assert set(info.value.missing) == {"CONTAINER_ID", "PUBLIC_IPADDR", "VAST_TCP_PORT_3000"}
    # MASTER_TOKEN is optional in the protocol (it defaults to empty there too).
    assert "MASTER_TOKEN" not in message


def test_master_token_is_optional_but_warned_about(caplog):
    environ = dict(FULL_ENV)
    del environ["MASTER_TOKEN"]
    with caplog.at_level(logging.WARNING):
        env = AutoscalerEnv.from_environ(environ, 3000)
    assert env is not None and env.master_token == ""
    assert "MASTER_TOKEN" in caplog.text


def test_invalid_environment_names_each_bad_value():
    environ = {
        **FULL_ENV,
        "CONTAINER_ID": "abc",
        "VAST_TCP_PORT_3000": "99999",
        "USE_SSL": "maybe",
        "REPORT_ADDR": "ftp://x",
    }
    with pytest.raises(InvalidEnvironment) as info:
        AutoscalerEnv.from_environ(environ, 3000)
    assert set(info.value.problems) == {"CONTAINER_ID", "VAST_TCP_PORT_3000", "USE_SSL",
                                        "REPORT_ADDR"}
    assert "'abc'" in str(info.value)


# --------------------------------------------------------------------------- signatures

@pytest.fixture
def fake() -> FakeAutoscaler:
    fake = FakeAutoscaler()
    fake.worker_url = WORKER_URL
    return fake


@pytest.fixture
def key(fake):
    return load_public_key(fake.pem)


def test_valid_signature_is_accepted(fake, key):
    auth = fake.make_auth_data(cost=1, reqnum=7, request_idx=99)
    auth["__request_id"] = "extra fields are ignored"
    parsed = verify(auth, key, legacy=False)
    assert (parsed.reqnum, parsed.request_idx, parsed.cost, parsed.url) == (7, 99, 1.0, WORKER_URL)


def test_signature_from_another_key_is_refused(fake):
    other = load_public_key(public_pem(new_private_key()))
    with pytest.raises(AuthError) as info:
        verify(fake.make_auth_data(), other, legacy=False)
    assert (info.value.status, info.value.reason) == (401, "invalid signature")


def test_tampered_url_is_refused(fake, key):
    auth = fake.make_auth_data()
    auth["url"] = "http://203.0.113.8:41234"
    with pytest.raises(AuthError) as info:
        verify(auth, key, legacy=False)
    assert (info.value.status, info.value.reason) == (401, "invalid signature")


def test_garbage_signature_is_a_401_not_a_crash(fake, key):
    for bad in ("not base64!!", "QUJD", ""):
        auth = fake.make_auth_data()
        auth["signature"] = bad
        with pytest.raises(AuthError) as info:
            verify(auth, key, legacy=False)
        assert info.value.status in (401, 422)


def test_missing_fields_are_all_named(fake, key):
    auth = fake.make_auth_data()
    del auth["reqnum"]
    del auth["signature"]
    with pytest.raises(AuthError) as info:
        verify(auth, key, legacy=False)
    assert (info.value.status, info.value.reason) == (422, "missing fields: reqnum, signature")


def test_malformed_fields_are_a_422(fake, key):
    auth = fake.make_auth_data()
    auth["reqnum"] = "seven"
    auth["cost"] = [1]
    with pytest.raises(AuthError) as info:
        verify(auth, key, legacy=False)
    assert info.value.status == 422
    assert "reqnum" in info.value.reason and "cost" in info.value.reason


def test_no_key_yet_is_a_401(fake):
    with pytest.raises(AuthError) as info:
        verify(fake.make_auth_data(), None, legacy=False)
    assert (info.value.status, info.value.reason) == (401, "public key not yet fetched")


def test_legacy_signatures_only_when_enabled(fake, key):
    auth = fake.make_auth_data(legacy=True)
    with pytest.raises(AuthError) as info:
        verify(auth, key, legacy=False)
    assert info.value.status == 401
    assert verify(auth, key, legacy=True).reqnum == auth["reqnum"]

    # Legacy signatures cover reqnum, so changing it breaks them.
    auth["reqnum"] += 1
    with pytest.raises(AuthError):
        verify(auth, key, legacy=True)


def test_oldest_legacy_layout_without_request_idx(fake, key):
    auth = {"cost": "1", "endpoint": "e", "reqnum": 3, "url": WORKER_URL}
    auth["signature"] = sign(fake.key, canonical(auth))
    auth["request_idx"] = 11
    assert verify(auth, key, legacy=True).request_idx == 11
    with pytest.raises(AuthError):
        verify(auth, key, legacy=False)


def test_current_format_still_works_with_legacy_enabled(fake, key):
    assert verify(fake.make_auth_data(), key, legacy=True).url == WORKER_URL


def test_replay_guard_refuses_a_repeat_within_the_window():
    now = [1000.0]
    guard = ReplayGuard(window=60.0, clock=lambda: now[0])
    guard.check_and_remember("sig", 1)
    guard.check_and_remember("sig", 2)  # same signature (it only covers the url), new reqnum
    with pytest.raises(AuthError) as info:
        guard.check_and_remember("sig", 1)
    assert (info.value.status, info.value.reason) == (401, "replayed request")
    now[0] += 61.0
    guard.check_and_remember("sig", 1)  # forgotten after the window


def test_replay_guard_memory_is_bounded():
    guard = ReplayGuard(window=3600.0, max_entries=100)
    for reqnum in range(1000):
        guard.check_and_remember("sig", reqnum)
    assert len(guard) == 100


class _Keys:
    def __init__(self, key):
        self.key = key


def test_authenticator_applies_replay_and_bare_request_rules(fake, key):
    auth = RequestAuthenticator(_Keys(key), expected_url=WORKER_URL + "/")
    data = fake.make_auth_data()
    assert auth.authenticate(data).request_idx == data["request_idx"]
    with pytest.raises(AuthError) as info:
        auth.authenticate(data)
    assert info.value.reason == "replayed request"
    with pytest.raises(AuthError) as info:
        auth.authenticate(None)
    assert (info.value.status, info.value.reason) == (401, "missing auth_data")
    with pytest.raises(AuthError) as info:
        auth.authenticate(fake.make_auth_data(url="http://198.51.100.9:1"))
    assert (info.value.status, info.value.reason) == (401, "request was signed for another worker")


def test_unsecured_skips_the_signature_but_not_the_shape(fake):
    auth = RequestAuthenticator(_Keys(None), unsecured=True)
    assert auth.authenticate(None) is None
    data = fake.make_auth_data()
    data["signature"] = "bogus"
    assert auth.authenticate(data).request_idx == data["request_idx"]
    del data["url"]
    with pytest.raises(AuthError) as info:
        auth.authenticate(data)
    assert info.value.status == 422


def test_parse_envelope_shapes():
    payload = {"input": {"modifier": "Text2Image"}}
    assert parse_envelope({"auth_data": {"a": 1}, "payload": payload}) == ({"a": 1}, payload)
    assert parse_envelope(payload) == (None, payload)
    cases = [
        ({"auth_data": {}}, "payload: field missing"),
        ({"auth_data": {}, "payload": [1]}, "payload must be a JSON object"),
        ({"auth_data": "x", "payload": {}}, "auth_data must be a JSON object"),
        ([1, 2], "request body must be a JSON object"),
    ]
    for body, reason in cases:
        with pytest.raises(AuthError) as info:
            parse_envelope(body)
        assert (info.value.status, info.value.reason) == (422, reason)


# --------------------------------------------------------------------------- public key

async def test_key_fetch_retries_until_the_autoscaler_comes_up(session):
    port = free_port()
    fetcher = PublicKeyFetcher([f"http://127.0.0.1:{port}"], session,
                               initial_backoff=0.05, max_backoff=0.1, timeout=1.0)
    fake = FakeAutoscaler()
    fetcher.start()
    try:
        assert await fetcher.wait_for_key(0.3) is None
        assert fetcher.attempts >= 2
        await fake.start(port)
        key = await fetcher.wait_for_key(5.0)
        assert key is not None
        assert key.public_numbers() == fake.key.public_key().public_numbers()
    finally:
        await fetcher.stop()
        await fake.stop()


async def test_key_fetch_waits_through_503_and_tries_each_address(session, fake_autoscaler):
    fake_autoscaler.pubkey_ready = False
    fetcher = PublicKeyFetcher([dead_url(), fake_autoscaler.url + "/"], session,
                               initial_backoff=0.05, max_backoff=0.1, timeout=1.0)
    fetcher.start()
    try:
        assert await fetcher.wait_for_key(0.3) is None
        assert fake_autoscaler.hits["/pubkey/"] >= 2
        fake_autoscaler.pubkey_ready = True
        assert await fetcher.wait_for_key(5.0) is not None
    finally:
        await fetcher.stop()


def test_load_public_key_refuses_garbage():
    with pytest.raises(ValueError):
        load_public_key("<html>502 Bad Gateway</html>")


# --------------------------------------------------------------------------- reporting

def simulate_traffic(reporter: StatusReporter) -> None:
    for idx in (1, 2, 3):
        reporter.request_received(idx)
    reporter.request_started(1)
    reporter.request_finished(1, True, RequestOutcome.SUCCESS)
    reporter.request_started(2)
    reporter.request_finished(2, False, RequestOutcome.ERROR)
    reporter.request_started(3)  # still running
    reporter.request_rejected(request_idx=4)


async def test_reports_carry_the_protocol_fields(session, fake_autoscaler):
    reporter = make_reporter(session, fake_autoscaler.url)
    simulate_traffic(reporter)
    assert await reporter.report_now()

    report = fake_autoscaler.statuses[-1]
    assert set(report) - {"_at"} == STATUS_FIELDS   # _at: when the fake received it
    assert report["id"] == 42 and report["mtoken"] == "master-token"
    assert report["url"] == "http://203.0.113.7:41234"
    assert report["version"]
    assert report["cur_load"] == 1            # request 3 is in flight
    assert report["new_load"] == 3            # three accepted since the last report
    assert report["cur_perf"] == 1            # one served successfully
    assert report["rej_load"] == 1
    assert report["num_requests_working"] == 1
    assert report["num_requests_recieved"] == 4
    assert report["working_request_idxs"] == [3]
    assert report["loadtime"] == 0 and report["error_msg"] == ""
    assert report["cur_capacity"] == 0 and report["max_capacity"] == 0

    # Interval counters restart after a delivered report; the running total does not.
    reporter.request_finished(3, True, RequestOutcome.SUCCESS)
    assert await reporter.report_now()
    report = fake_autoscaler.statuses[-1]
    assert (report["new_load"], report["cur_perf"], report["rej_load"]) == (0, 1, 0)
    assert (report["cur_load"], report["num_requests_working"]) == (0, 0)
    assert report["num_requests_recieved"] == 4


async def test_cancelled_requests_are_not_new_load_or_served(session, fake_autoscaler):
    reporter = make_reporter(session, fake_autoscaler.url)
    reporter.request_received(5)
    reporter.request_received(6)
    reporter.request_finished(5, True, RequestOutcome.CANCELLED)
    assert await reporter.report_now()
    report = fake_autoscaler.statuses[-1]
    assert (report["new_load"], report["cur_perf"], report["cur_load"]) == (1, 0, 1)


async def test_finished_requests_are_sent_to_delete_requests(session, fake_autoscaler):
    reporter = make_reporter(session, fake_autoscaler.url)
    simulate_traffic(reporter)
    assert await reporter.flush_deletes()

    batch = fake_autoscaler.deletes[-1]
    assert batch["worker_id"] == 42 and batch["mtoken"] == "master-token"
    by_idx = {item["request_idx"]: item for item in batch["requests"]}
    assert set(by_idx) == {1, 2, 4}
    assert (by_idx[1]["success"], by_idx[1]["status"]) == (True, "Success")
    assert (by_idx[2]["success"], by_idx[2]["status"]) == (False, "Error")
    assert (by_idx[4]["success"], by_idx[4]["status"]) == (False, "Rejected")
    first = by_idx[1]
    assert set(first) == {"request_idx", "success", "status", "entered_queue_at",
                          "work_started_at", "work_completed_at"}
    assert 0 < first["entered_queue_at"] <= first["work_started_at"] <= first["work_completed_at"]

    # Delivered once: nothing is pending, and a second flush sends nothing.
    assert reporter.pending_deletes == 0
    assert await reporter.flush_deletes()
    assert len(fake_autoscaler.deletes) == 1


async def test_explicit_timestamps_are_passed_through(session, fake_autoscaler):
    reporter = make_reporter(session, fake_autoscaler.url)
    reporter.request_finished(8, True, "Success", entered_queue_at=10.0, work_started_at=11.0,
                              work_completed_at=12.5)
    assert await reporter.flush_deletes()
    item = fake_autoscaler.deletes[-1]["requests"][0]
    assert (item["entered_queue_at"], item["work_started_at"], item["work_completed_at"]) == (
        10.0, 11.0, 12.5)


async def test_state_change_is_reported_at_once_and_loadtime_in_every_report(
        session, fake_autoscaler):
    reporter = make_reporter(session, fake_autoscaler.url, interval=30.0, min_interval=5.0)
    async with reporter:
        first = await fake_autoscaler.wait_for_status()  # the first report goes out on start
        assert (first["loadtime"], first["max_perf"]) == (0, 0)
        loop = asyncio.get_running_loop()
        changed_at = loop.time()
        reporter.set_state(loadtime=12.5, max_perf=25.0)
        ready = await fake_autoscaler.wait_for_status(lambda r: r["loadtime"] > 0, timeout=2.0)
        assert loop.time() - changed_at < allowance(1.0)   # not the 30 s cadence
        assert (ready["loadtime"], ready["max_perf"]) == (12.5, 25.0)
        assert await reporter.report_now()
        assert fake_autoscaler.statuses[-1]["loadtime"] == 12.5   # in every report, as the SDK

        reporter.set_state(loadtime=12.5, max_perf=25.0, error_msg="ComfyUI failed: crash loop")
        errored = await fake_autoscaler.wait_for_status(lambda r: r["error_msg"], timeout=2.0)
        assert (errored["loadtime"], errored["max_perf"]) == (12.5, 25.0)

        # Setting the same state again is not a change and sends nothing.
        count = len(fake_autoscaler.statuses)
        reporter.set_state(loadtime=12.5, max_perf=25.0, error_msg="ComfyUI failed: crash loop")
        await asyncio.sleep(0.2)
        assert len(fake_autoscaler.statuses) == count


async def test_request_activity_is_reported_within_min_interval(session, fake_autoscaler):
    reporter = make_reporter(session, fake_autoscaler.url, interval=30.0, min_interval=0.1,
                             delete_interval=0.1)
    async with reporter:
        await fake_autoscaler.wait_for_status()
        reporter.request_received(1)
        report = await fake_autoscaler.wait_for_status(lambda r: r["new_load"] == 1, timeout=2.0)
        assert report["working_request_idxs"] == [1]
        reporter.request_finished(1, True, RequestOutcome.SUCCESS)
        await fake_autoscaler.wait_for_delete(timeout=3.0)


async def test_addresses_are_tried_in_turn(session, fake_autoscaler):
    broken = FakeAutoscaler()
    await broken.start()
    await broken.go_down(Outage.ERROR_503)
    try:
        reporter = make_reporter(session, dead_url(), broken.url, fake_autoscaler.url)
        reporter.request_received(1)
        assert await reporter.report_now()
        assert broken.hits["/worker_status/"] == 1
        assert fake_autoscaler.statuses[-1]["new_load"] == 1
        # The address that answered is tried first next time: no repeated wait on dead ones.
        assert await reporter.report_now()
        assert broken.hits["/worker_status/"] == 1
        reporter.request_finished(1, True, RequestOutcome.SUCCESS)
        assert await reporter.flush_deletes()
        assert fake_autoscaler.deletes[-1]["requests"][0]["request_idx"] == 1
    finally:
        await broken.stop()


@pytest.mark.parametrize("outage", [Outage.ERROR_503, Outage.CLOSED])
async def test_autoscaler_down_keeps_counters_and_never_raises(session, fake_autoscaler, outage):
    reporter = make_reporter(session, fake_autoscaler.url, interval=0.2, min_interval=0.05,
                             delete_interval=0.05)
    async with reporter:
        await fake_autoscaler.wait_for_status()
        await fake_autoscaler.go_down(outage)
        for idx in range(1, 4):
            reporter.request_received(idx)
            reporter.request_finished(idx, True, RequestOutcome.SUCCESS)
        await asyncio.sleep(0.4)                  # several failed attempts meanwhile
        assert reporter.consecutive_failures >= 1
        assert reporter.pending_deletes == 3
        assert not await reporter.report_now()    # reports failure, raises nothing

        await fake_autoscaler.come_up()
        report = await fake_autoscaler.wait_for_status(lambda r: r["cur_perf"] == 3, timeout=5.0)
        assert report["new_load"] == 3
        batch = await fake_autoscaler.wait_for_delete(timeout=5.0)
        assert sorted(item["request_idx"] for item in batch["requests"]) == [1, 2, 3]
        assert reporter.consecutive_failures == 0


async def test_outage_is_logged_once_per_n_failures(session, caplog):
    reporter = make_reporter(session, dead_url(), failure_log_every=3)
    with caplog.at_level(logging.WARNING, logger="supervisor.autoscaler"):
        for _ in range(7):
            assert not await reporter.report_now()
    warnings = [r for r in caplog.records if "worker status" in r.getMessage()]
    assert len(warnings) == 3                      # failures 1, 3 and 6


def test_failure_log_announces_recovery(caplog):
    failures = FailureLog(logging.getLogger("test.failures"), "calling x", every=5)
    with caplog.at_level(logging.INFO, logger="test.failures"):
        for _ in range(4):
            failures.failed("refused")
        failures.succeeded()
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "after 4 failure(s)" in caplog.records[-1].getMessage()


async def test_pending_finished_requests_are_bounded(session):
    reporter = make_reporter(session, dead_url(), max_pending_deletes=3)
    for idx in range(5):
        reporter.request_received(idx)
        reporter.request_finished(idx, True, RequestOutcome.SUCCESS)
    assert reporter.pending_deletes == 3
    assert reporter.stats.deletes_dropped == 2


async def test_stop_is_bounded_when_the_autoscaler_is_unreachable(session, fake_autoscaler):
    reporter = make_reporter(session, fake_autoscaler.url, interval=0.5, min_interval=0.1)
    reporter.start()
    await fake_autoscaler.wait_for_status()
    await fake_autoscaler.go_down(Outage.CLOSED)
    reporter.request_received(1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await reporter.stop(flush_timeout=0.5)
    assert loop.time() - started < allowance(1.5)


async def test_final_flush_on_stop_delivers_last_counts(session, fake_autoscaler):
    reporter = make_reporter(session, fake_autoscaler.url, interval=30.0, min_interval=10.0)
    async with reporter:
        await fake_autoscaler.wait_for_status()
        reporter.request_received(9)
        reporter.request_finished(9, True, RequestOutcome.SUCCESS)
    assert fake_autoscaler.statuses[-1]["cur_perf"] == 1
    assert fake_autoscaler.deletes[-1]["requests"][0]["request_idx"] == 9


async def test_disk_usage_is_measured_as_the_sdk_does(session, fake_autoscaler, tmp_path):
    reporter = make_reporter(session, fake_autoscaler.url, disk_path=str(tmp_path))
    assert await reporter.report_now()
    first = fake_autoscaler.statuses[-1]
    # Used GiB of the filesystem, as psutil reads it (the SDK's disk_usage("/").used / 2**30).
    used = psutil.disk_usage(str(tmp_path)).used / 2**30
    assert abs(first["disk_usage"] - used) < 0.5
    assert await reporter.report_now()
    second = fake_autoscaler.statuses[-1]
    # The change since the last delivered report (whatever else on the machine wrote).
    assert second["additional_disk_usage"] == pytest.approx(
        second["disk_usage"] - first["disk_usage"])


async def test_route_gives_auth_data_the_worker_accepts(session, fake_autoscaler):
    fake_autoscaler.api_key = "client-key"
    fake_autoscaler.worker_url = WORKER_URL
    body = {"endpoint": "comfy", "api_key": "client-key", "cost": 1}
    async with session.post(fake_autoscaler.url + "/route/", json=body) as resp:
        assert resp.status == 200
        auth_data = await resp.json()
    fetcher = PublicKeyFetcher([fake_autoscaler.url], session)
    fetcher.start()
    try:
        authenticator = RequestAuthenticator(fetcher, expected_url=WORKER_URL)
        assert await fetcher.wait_for_key(5.0) is not None
        parsed = authenticator.authenticate(auth_data)
        assert (parsed.endpoint, parsed.cost, parsed.url) == ("comfy", 1.0, WORKER_URL)
    finally:
        await fetcher.stop()

    async with session.post(fake_autoscaler.url + "/route/",
                            json={**body, "api_key": "wrong"}) as resp:
        assert resp.status == 401


# --------------------------------------------------------------------------- the link's rules

async def test_rejected_requests_count_once_and_not_as_new_load(session, fake_autoscaler):
    reporter = make_reporter(session, fake_autoscaler.url)
    reporter.request_rejected(100.0, request_idx=7)
    reporter.request_received(8, 100.0)
    assert await reporter.report_now()
    report = fake_autoscaler.statuses[-1]
    assert (report["num_requests_recieved"], report["new_load"], report["rej_load"]) == \
        (2, 100, 100)


async def test_a_session_holds_its_workload_until_it_closes(session, fake_autoscaler):
    reporter = make_reporter(session, fake_autoscaler.url)
    reporter.session_opened(30, 100.0)
    reporter.session_request(100.0)
    reporter.session_request_done(100.0, RequestOutcome.SUCCESS)
    assert await reporter.report_now()
    report = fake_autoscaler.statuses[-1]
    assert (report["cur_load"], report["working_request_idxs"], report["new_load"],
            report["cur_perf"], report["num_requests_recieved"]) == (100, [30], 200, 100, 1)
    reporter.session_closed(30)
    assert await reporter.report_now() and await reporter.flush_deletes()
    report = fake_autoscaler.statuses[-1]
    assert (report["cur_load"], report["working_request_idxs"], report["cur_perf"]) == \
        (0, [], 100)
    (done,) = fake_autoscaler.deletes[-1]["requests"]
    assert (done["request_idx"], done["status"], done["success"]) == (30, "Success", True)


def link_settings(**env: str):
    from config import load_settings

    return load_settings(None, environ={
        "REPORT_ADDR": "http://unused", "CONTAINER_ID": "42", "PUBLIC_IPADDR": "203.0.113.7",
        "AUTOSCALER_REPORT_INTERVAL": "0.2", **env})


async def test_ready_only_once_the_key_is_here_then_loadtime_in_every_report(fake_autoscaler):
    from supervisor.autoscaler.link import AutoscalerLink
    from supervisor.state import Readiness, WorkerState

    fake_autoscaler.pubkey_ready = False
    started = time.time() - 30
    now = {"readiness": Readiness(WorkerState.READY, "ready", 0.5, started)}
    link = AutoscalerLink(make_env(fake_autoscaler.url), link_settings())
    await link.start(lambda: now["readiness"])
    try:
        serving = await fake_autoscaler.wait_for_status(timeout=3.0)
        await asyncio.sleep(0.5)
        # Serving, but a routed request could not be verified yet: not ready.
        assert all(r["loadtime"] == 0 and r["max_perf"] == 0 for r in fake_autoscaler.statuses)
        assert serving["error_msg"] == ""
        fake_autoscaler.pubkey_ready = True
        ready = await fake_autoscaler.wait_for_status(lambda r: r["loadtime"] > 0, timeout=5.0)
        # 0.5 requests per second of 100 workload each; the time since the worker started.
        assert ready["max_perf"] == 50.0 and ready["loadtime"] >= 30
        # An instance out for a restart: less capacity, the same loadtime, no error.
        now["readiness"] = Readiness(WorkerState.UNHEALTHY, "ComfyUI restarting", None, started)
        mark = time.time()
        link.state_changed()
        out = await fake_autoscaler.wait_for_status(
            lambda r: r["_at"] > mark and r["max_perf"] == 0, timeout=3.0)
        assert (out["loadtime"], out["error_msg"]) == (ready["loadtime"], "")
        # What will not heal is error_msg, and it stays once the state moves on.
        now["readiness"] = Readiness(WorkerState.UNHEALTHY, "x", None, started,
                                     fatal="ComfyUI failed: crash loop")
        link.state_changed()
        now["readiness"] = Readiness(WorkerState.STARTING, "y", None, started)
        link.state_changed()
        await fake_autoscaler.wait_for_status(lambda r: r["error_msg"], timeout=3.0)
        await asyncio.sleep(0.5)
        assert fake_autoscaler.statuses[-1]["error_msg"] == "ComfyUI failed: crash loop"
    finally:
        await link.stop()


def test_the_autoscaler_settings_may_come_from_the_file_alone(tmp_path):
    """An operator who writes the autoscaler's settings in the file (config check accepts
    them, config show shows them) gets them used: only the port Vast maps comes from the
    environment; the environment still wins where it says something."""
    from config import load_settings
    from supervisor.daemon.wiring import WiringError, build_components

    path = tmp_path / "worker.toml"
    path.write_text('[autoscaler]\nreport_addr = "http://autoscaler.test"\n'
                    'container_id = "42"\nmaster_token = "from-the-file"\n'
                    'public_ipaddr = "203.0.113.7"\n')
    environ = {"VAST_TCP_PORT_3000": "40123"}
    settings = load_settings(path, environ=environ)
    env = build_components(settings, environ)["autoscaler"].env
    assert (env.container_id, env.master_token, env.public_url) == \
        (42, "from-the-file", "http://203.0.113.7:40123")
    environ = {**environ, "MASTER_TOKEN": "from-the-environment"}
    env = build_components(load_settings(path, environ=environ), environ)["autoscaler"].env
    assert env.master_token == "from-the-environment"
    # What neither says is named both ways.
    path.write_text('[autoscaler]\nreport_addr = "http://autoscaler.test"\n')
    with pytest.raises(WiringError) as info:
        build_components(load_settings(path, environ={}), {})
    assert "CONTAINER_ID, PUBLIC_IPADDR, VAST_TCP_PORT_3000" in str(info.value)
    assert "autoscaler.container_id, autoscaler.public_ipaddr in the configuration file" in \
        str(info.value)
