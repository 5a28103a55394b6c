"""Webhook delivery against a real aiohttp receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from api.host.netcheck import GuardedResolver, TargetRefused
from api.wrapper.s3 import RequestFieldError
from api.wrapper.webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    DeliveryState,
    WebhookDispatcher,
    WebhookSettings,
    check_webhook_url,
    merge,
    parse_retry_after,
    sign,
)
from tests.support.net import free_port
from tests.support.timing import allowance

PAYLOAD = {
    "id": "req-42",
    "status": "completed",
    "message": "done",
    "output": [{"filename": "a.png", "url": "https://example.invalid/a.png"}],
    "timings": {"total_ms": 1234},
    "comfyui_response": {"not": "sent"},
}


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class Receiver:
    """A webhook receiver that answers from a script and records every request."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.script: list[Reply] = []
        self.hits: list[tuple[dict[str, str], bytes]] = []
        self.hit_event = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.hits.append((dict(request.headers), body))
        self.hit_event.set()
        reply = self.script.pop(0) if self.script else Reply()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        return web.Response(status=reply.status, headers=reply.headers, text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        # Cancel a sleeping handler when the client gives up, so shutdown is quick.
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for_hits(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.hits) < count:
            self.hit_event.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"expected {count} hit(s), got {len(self.hits)}")
            try:
                await asyncio.wait_for(self.hit_event.wait(), remaining)
            except asyncio.TimeoutError:
                pass


@pytest.fixture
async def receiver():
    rec = Receiver()
    await rec.start()
    yield rec
    await rec.stop()


@pytest.fixture
async def make_dispatcher(tmp_path):
    made: list[WebhookDispatcher] = []

    async def factory(**kwargs) -> WebhookDispatcher:
        kwargs.setdefault("spool_dir", tmp_path / "spool")
        kwargs.setdefault("backoff_initial", 0.02)
        kwargs.setdefault("backoff_max", 0.2)
        kwargs.setdefault("allow_private_targets", True)  # the receiver is on loopback
        dispatcher = WebhookDispatcher(**kwargs)
        await dispatcher.start()
        made.append(dispatcher)
        return dispatcher

    yield factory
    for dispatcher in made:
        await dispatcher.close()


def spooled_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.json")) if directory.exists() else []


async def test_body_is_signed_and_carries_extra_params(receiver, make_dispatcher, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "hook-secret-never-logged-987"
    dispatcher = await make_dispatcher()
    settings = WebhookSettings(url=receiver.url, timeout=5, secret=secret, extra_params={"job": "abc", "n": 3})

    result = await dispatcher.submit(settings, PAYLOAD, "req-42")

    assert result.state is DeliveryState.DELIVERED and result.attempts == 1 and result.status == 200
    [(headers, body)] = receiver.hits
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == expected == sign(body, secret)
    assert headers["Content-Type"] == "application/json"
    assert headers[DELIVERY_HEADER] == result.delivery_id
    document = json.loads(body)
    assert document == {
        "id": "req-42",
        "status": "completed",
        "message": "done",
        "output": PAYLOAD["output"],
        "timings": {"total_ms": 1234},
        "extra": {"job": "abc", "n": 3},
    }
    assert spooled_files(tmp_path / "spool") == []
    assert secret not in caplog.text
    assert "req-42" in caplog.text


async def test_no_signature_header_without_secret(receiver, make_dispatcher):
    dispatcher = await make_dispatcher()
    await dispatcher.submit(WebhookSettings(url=receiver.url), PAYLOAD, "r")
    [(headers, _)] = receiver.hits
    assert SIGNATURE_HEADER not in headers


async def test_server_errors_are_retried_until_delivered_once(receiver, make_dispatcher):
    receiver.script = [Reply(500), Reply(502), Reply(200)]
    dispatcher = await make_dispatcher(retries=5)
    result = await dispatcher.submit(WebhookSettings(url=receiver.url, secret="s"), PAYLOAD, "r5")
    assert result.state is DeliveryState.DELIVERED
    assert result.attempts == 3
    assert len(receiver.hits) == 3
    # The same bytes and signature every time, so receivers can deduplicate.
    assert len({body for _, body in receiver.hits}) == 1
    assert len({h[SIGNATURE_HEADER] for h, _ in receiver.hits}) == 1
    await asyncio.sleep(0.05)
    assert len(receiver.hits) == 3  # nothing more after the 200


async def test_client_error_is_final_and_logged_with_request_id(receiver, make_dispatcher, tmp_path, caplog):
    receiver.script = [Reply(400)]
    dispatcher = await make_dispatcher(retries=5)
    result = await dispatcher.submit(WebhookSettings(url=receiver.url), PAYLOAD, "req-bad-400")
    assert result.state is DeliveryState.FAILED and result.status == 400 and result.attempts == 1
    await asyncio.sleep(0.1)
    assert len(receiver.hits) == 1
    assert spooled_files(tmp_path / "spool") == []
    assert any("req-bad-400" in r.getMessage() and "HTTP 400" in r.getMessage() for r in caplog.records)


async def test_redirect_is_not_followed(receiver, make_dispatcher):
    receiver.script = [Reply(302, {"Location": "http://127.0.0.1:1/elsewhere"})]
    dispatcher = await make_dispatcher()
    result = await dispatcher.submit(WebhookSettings(url=receiver.url), PAYLOAD, "r")
    assert result.state is DeliveryState.FAILED and "redirect" in (result.error or "")
    assert len(receiver.hits) == 1


async def test_retries_are_bounded(receiver, make_dispatcher):
    receiver.script = [Reply(503)] * 10
    dispatcher = await make_dispatcher(retries=2)
    result = await dispatcher.submit(WebhookSettings(url=receiver.url), PAYLOAD, "r")
    assert result.state is DeliveryState.FAILED and result.attempts == 3
    assert len(receiver.hits) == 3


async def test_retry_after_is_honoured_but_capped(receiver, make_dispatcher):
    # Retry-After asks for an hour; the cap (backoff_max) keeps the wait short.
    receiver.script = [Reply(429, {"Retry-After": "3600"}), Reply(200)]
    dispatcher = await make_dispatcher(backoff_initial=0.01, backoff_max=0.3)
    started = time.monotonic()
    result = await dispatcher.submit(WebhookSettings(url=receiver.url), PAYLOAD, "r")
    elapsed = time.monotonic() - started
    assert result.state is DeliveryState.DELIVERED and result.attempts == 2
    assert 0.25 <= elapsed < allowance(2.0)


def test_parse_retry_after_accepts_seconds_and_dates():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


async def test_timeout_is_honoured(receiver, make_dispatcher):
    receiver.script = [Reply(200, delay=5), Reply(200, delay=5)]
    dispatcher = await make_dispatcher(retries=1)
    started = time.monotonic()
    result = await dispatcher.submit(WebhookSettings(url=receiver.url, timeout=0.3), PAYLOAD, "slow")
    elapsed = time.monotonic() - started
    assert result.state is DeliveryState.FAILED
    assert "no answer within 0.3s" in (result.error or "")
    assert len(receiver.hits) == 2  # the timeout counted as a failed try and was retried
    assert 0.6 <= elapsed < allowance(2.0)


async def test_spooled_delivery_survives_a_restart(tmp_path, make_dispatcher):
    spool = tmp_path / "spool"
    port = free_port()
    down = Receiver(port)  # not started: connections are refused
    first = await make_dispatcher(spool_dir=spool, retries=100, backoff_initial=0.05, backoff_max=0.1)
    task = first.submit(WebhookSettings(url=down.url, secret="k", extra_params={"a": 1}), PAYLOAD, "req-restart")
    await asyncio.sleep(0.3)  # a few refused tries
    assert not task.done()
    [spooled] = spooled_files(spool)
    stored = json.loads(spooled.read_bytes())
    assert stored["request_id"] == "req-restart" and "secret" not in stored
    await first.close()
    assert (await task).state is DeliveryState.SPOOLED
    assert spooled_files(spool) == [spooled]  # close() left it there

    await down.start()
    try:
        second = await make_dispatcher(spool_dir=spool)
        await down.wait_for_hits(1)
        assert await second.drain(timeout=5)
        [(headers, body)] = down.hits
        assert json.loads(body)["id"] == "req-42" and json.loads(body)["extra"] == {"a": 1}
        assert headers[SIGNATURE_HEADER] == sign(body, "k")
        assert spooled_files(spool) == []
    finally:
        await down.stop()


async def test_old_spooled_items_are_dropped_with_a_log_line(tmp_path, make_dispatcher, caplog):
    spool = tmp_path / "spool"
    down = Receiver(free_port())
    first = await make_dispatcher(spool_dir=spool, retries=100, backoff_initial=0.05, backoff_max=0.1)
    first.submit(WebhookSettings(url=down.url), PAYLOAD, "req-too-old")
    await asyncio.sleep(0.15)
    await first.close()
    assert len(spooled_files(spool)) == 1
    await down.start()
    try:
        await make_dispatcher(spool_dir=spool, max_age=0.05)
        await asyncio.sleep(0.1)
        assert down.hits == []
        assert spooled_files(spool) == []
        assert any("req-too-old" in r.getMessage() and "max age" in r.getMessage() for r in caplog.records)
    finally:
        await down.stop()


async def test_full_spool_drops_the_oldest_with_an_error_and_a_count(tmp_path, make_dispatcher,
                                                                     caplog):
    spool = tmp_path / "spool"
    down = Receiver(free_port())  # refuses connections: every delivery stays pending
    first = await make_dispatcher(spool_dir=spool, retries=100, backoff_initial=0.05,
                                  backoff_max=0.1)
    tasks = [first.submit(WebhookSettings(url=down.url), PAYLOAD, f"req-{n}") for n in range(3)]
    await asyncio.sleep(0.2)
    sizes = [p.stat().st_size for p in spooled_files(spool)]
    assert len(sizes) == 3
    await first.close()
    # Room for two of the three: the restart drops the oldest, says so and counts it. (A file's
    # size moves by a few bytes with its retry state, hence the slack, far below one file.)
    budget = sizes[1] + sizes[2] + 64
    second = await make_dispatcher(spool_dir=spool, retries=100, backoff_initial=0.05,
                                   backoff_max=0.1, max_bytes=budget)
    assert second.dropped == 1 and len(spooled_files(spool)) == 2
    assert any(r.levelname == "ERROR" and "req-0" in r.getMessage()
               and "webhook.spool_max_bytes" in r.getMessage() for r in caplog.records)
    # A new delivery pushes out the next oldest, whose task ends as dropped.
    latest = second.submit(WebhookSettings(url=down.url), PAYLOAD, "req-3")
    await asyncio.sleep(0.2)
    assert second.dropped == 2 and not latest.done()
    names = [json.loads(p.read_bytes())["request_id"] for p in spooled_files(spool)]
    assert names == ["req-2", "req-3"]
    assert second.spool_bytes <= budget
    for task in tasks:
        assert (await task).state is DeliveryState.SPOOLED


async def test_corrupt_spool_file_is_set_aside(tmp_path, make_dispatcher):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "0000000000001-bad.json").write_text("{not json")
    await make_dispatcher(spool_dir=spool)
    assert spooled_files(spool) == []
    assert (spool / "0000000000001-bad.corrupt").exists()


async def test_private_target_is_refused_unless_allowed_or_trusted(receiver, make_dispatcher, tmp_path, caplog):
    strict = await make_dispatcher(allow_private_targets=False, spool_dir=tmp_path / "a")
    result = await strict.submit(WebhookSettings(url=receiver.url), PAYLOAD, "req-ssrf")
    assert result.state is DeliveryState.REFUSED
    assert "loopback" in (result.error or "")
    by_name = await strict.submit(
        WebhookSettings(url=f"http://localhost:{receiver.port}/hook"), PAYLOAD, "req-ssrf-name"
    )
    assert by_name.state is DeliveryState.REFUSED
    assert receiver.hits == []
    assert any("req-ssrf" in r.getMessage() for r in caplog.records)
    assert spooled_files(tmp_path / "a") == []

    # The operator's own WEBHOOK_URL is always allowed.
    operator = await make_dispatcher(
        allow_private_targets=False, trusted_urls={receiver.url}, spool_dir=tmp_path / "b"
    )
    ok = await operator.submit(WebhookSettings(url=receiver.url), PAYLOAD, "req-operator")
    assert ok.state is DeliveryState.DELIVERED and len(receiver.hits) == 1


async def test_guarded_resolver_refuses_names_of_private_hosts(receiver):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=GuardedResolver())) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as info:
            await session.post(f"http://localhost:{receiver.port}/hook", data=b"{}")
    assert isinstance(info.value.os_error, TargetRefused)
    assert receiver.hits == []


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:8080/x", "loopback"),
        ("http://localhost/x", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[fd12:3456::1]/", "unique-local"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://[::]/", "unspecified"),
        ("http://10.1.2.3/", "private"),
        ("http://192.168.0.10/", "private"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://100.64.0.1/", "non-public"),
        ("ftp://example.com/", "http:// or https://"),
        ("http:///nohost", "no host"),
    ],
)
async def test_check_webhook_url_refuses_non_public_targets(url, words):
    message = await check_webhook_url(url, allow_private=False)
    assert message is not None and words in message


async def test_check_webhook_url_allows_public_private_when_allowed_and_trusted():
    assert await check_webhook_url("https://93.184.216.34/hook", allow_private=False) is None
    assert await check_webhook_url("http://127.0.0.1:9/x", allow_private=True) is None
    assert await check_webhook_url("http://127.0.0.1:9/x", trusted_urls={"http://127.0.0.1:9/x"}) is None
    unresolvable = await check_webhook_url("http://no-such-host.invalid/x")
    assert unresolvable is not None and "does not resolve" in unresolvable


def test_merge_is_field_by_field():
    env = WebhookSettings(url="https://ops.example.com/hook", timeout=30, secret="ops-secret")
    assert merge(env, None) == env
    only_extra = merge(env, {"extra_params": {"k": "v"}, "url": ""})
    assert only_extra.url == env.url and only_extra.secret == "ops-secret"
    assert only_extra.extra_params == {"k": "v"}
    timed = merge(env, {"timeout": 5})
    assert timed.timeout == 5.0 and timed.url == env.url
    own = merge(env, {"url": "https://client.example.com/h", "secret": "client-secret"})
    assert (own.url, own.secret, own.timeout) == ("https://client.example.com/h", "client-secret", 30)
    # The operator's secret is not lent to a client's receiver.
    foreign = merge(env, {"url": "https://client.example.com/h"})
    assert foreign.url == "https://client.example.com/h" and foreign.secret == ""
    assert merge(WebhookSettings(), {"url": "https://a.example.com/"}).enabled


@pytest.mark.parametrize(
    ("block", "field_name", "words"),
    [
        ({"uri": "x"}, "webhook", "unknown field(s) uri"),
        ({"url": 5}, "webhook.url", "must be a string"),
        ({"url": "file:///etc/passwd"}, "webhook.url", "http:// or https://"),
        ({"timeout": -1}, "webhook.timeout", "more than 0"),
        ({"timeout": True}, "webhook.timeout", "number of seconds"),
        ({"timeout": 100000}, "webhook.timeout", "at most"),
        ({"secret": 123}, "webhook.secret", "must be a string"),
        ({"extra_params": [1, 2]}, "webhook.extra_params", "must be an object"),
        ("nope", "webhook", "must be an object"),
    ],
)
def test_merge_rejects_malformed_blocks(block, field_name, words):
    with pytest.raises(RequestFieldError) as info:
        merge(WebhookSettings(), block)
    assert info.value.field == field_name and words in str(info.value)


def test_settings_from_env_and_repr_hides_the_secret():
    settings = WebhookSettings.from_env(
        {"WEBHOOK_URL": "https://ops.example.com/h?token=abc", "WEBHOOK_TIMEOUT": "12.5", "WEBHOOK_SECRET": "zz-top"}
    )
    assert settings.timeout == 12.5 and settings.secret == "zz-top"
    shown = repr(settings)
    assert "zz-top" not in shown and "token=abc" not in shown and "<set>" in shown
    assert WebhookSettings.from_env({}).timeout == 30.0
    with pytest.raises(ValueError, match="WEBHOOK_TIMEOUT"):
        WebhookSettings.from_env({"WEBHOOK_TIMEOUT": "soon"})


async def test_submit_before_start_says_what_to_do(tmp_path):
    dispatcher = WebhookDispatcher(tmp_path / "s")
    with pytest.raises(RuntimeError, match="start"):
        dispatcher.submit(WebhookSettings(url="https://a.example.com/"), PAYLOAD, "r")
