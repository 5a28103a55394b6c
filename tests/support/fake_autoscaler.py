"""A local stand-in for a Vast.ai-style autoscaler, for tests.

It speaks the worker-facing half of the protocol on 127.0.0.1 over real HTTP:

* ``GET /pubkey/`` serves the PEM of an RSA key generated for the test run;
* ``POST /worker_status/`` and ``POST /delete_requests/`` are recorded for assertions;
* ``POST /route/`` answers a client's ``{"endpoint", "api_key", "cost"}`` with signed
  ``auth_data`` for the registered worker URL, so a client can be tested end to end. With
  ``route_when_ready`` it routes, as an autoscaler does, only to a worker whose last report says
  it is ready (``loadtime`` > 0), at the ``url`` that report gives; until then it answers
  without a ``url`` and the client polls with the same ``request_idx`` (the vastai SDK's client
  does).

Every record carries ``_at``, the time (``time.time()``) it arrived; ``pubkey_served_at`` lists
when the key was handed out; ``routed`` the auth_data ``/route/`` handed out.

It can go down in two ways: ``Outage.ERROR_503`` (answers every call with 503) and
``Outage.CLOSED`` (its port is closed and open connections dropped), and come back up on the
same port. Use the ``fake_autoscaler`` fixture (tests/conftest.py registers this module as a plugin),
or construct one and ``await start()``; ``ThreadedAutoscaler`` serves fakes from a thread for
synchronous tests.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import functools
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

LOOPBACK = "127.0.0.1"


def new_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.lru_cache(maxsize=1)
def shared_private_key() -> rsa.RSAPrivateKey:
    """One key per test session: generating a 2048-bit key per test would dominate run time."""
    return new_private_key()


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def canonical(message: dict[str, Any]) -> bytes:
    """The autoscaler's serialisation of what it signs."""
    return json.dumps(message, indent=4, sort_keys=True).encode("utf-8")


def sign(key: rsa.RSAPrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()


class Outage(enum.Enum):
    NONE = "none"
    ERROR_503 = "503"
    CLOSED = "closed"


class FakeAutoscaler:
    def __init__(
        self,
        key: rsa.RSAPrivateKey | None = None,
        *,
        api_key: str | None = None,
        legacy_signatures: bool = False,
        route_when_ready: bool = False,
    ) -> None:
        self.key = key if key is not None else shared_private_key()
        self.api_key = api_key
        self.legacy_signatures = legacy_signatures
        self.route_when_ready = route_when_ready
        self.worker_url: str | None = None
        self.pubkey_ready = True
        self.pubkey_served_at: list[float] = []
        self.outage = Outage.NONE
        self.statuses: list[dict[str, Any]] = []
        self.deletes: list[dict[str, Any]] = []
        self.routes: list[dict[str, Any]] = []
        self.routed: list[dict[str, Any]] = []     # the auth_data /route/ handed out
        self.hits: Counter[str] = Counter()
        self.port: int | None = None
        self.host = LOOPBACK
        self._reqnum = 0
        self._request_idx = 0
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("call start() first")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pem(self) -> str:
        return public_pem(self.key)

    async def start(self, port: int = 0, host: str = LOOPBACK) -> str:
        """Listen on ``port`` (0: any free one) of ``host``; returns the base URL on loopback.

        ``host="0.0.0.0"`` lets a container reach it through its gateway address."""
        app = web.Application(middlewares=[self._outage_middleware])
        app.router.add_get("/pubkey/", self._pubkey)
        app.router.add_post("/worker_status/", self._worker_status)
        app.router.add_post("/delete_requests/", self._delete_requests)
        app.router.add_post("/route/", self._route)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        self.host = host
        self.port = runner.addresses[0][1]
        self.outage = Outage.NONE
        return self.url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def go_down(self, outage: Outage = Outage.ERROR_503) -> None:
        self.outage = outage
        if outage is Outage.CLOSED:
            await self.stop()

    async def come_up(self) -> None:
        if self._runner is None:
            assert self.port is not None, "start() was never called"
            await self.start(self.port, self.host)
        self.outage = Outage.NONE

    # ------------------------------------------------------------------ signing helpers

    def make_auth_data(
        self,
        url: str | None = None,
        *,
        cost: float = 1,
        endpoint: str = "comfy-test",
        reqnum: int | None = None,
        request_idx: int | None = None,
        legacy: bool | None = None,
    ) -> dict[str, Any]:
        """Signed ``auth_data`` as ``/route/`` would give it for ``url`` (default: worker_url)."""
        target = url if url is not None else self.worker_url
        if target is None:
            raise ValueError("no worker url: pass url= or set worker_url")
        if reqnum is None:
            self._reqnum += 1
            reqnum = self._reqnum
        if request_idx is None:
            self._request_idx += 1
            request_idx = self._request_idx
        auth = {
            "cost": cost,
            "endpoint": endpoint,
            "reqnum": reqnum,
            "request_idx": request_idx,
            "url": target,
        }
        use_legacy = self.legacy_signatures if legacy is None else legacy
        message = canonical(auth) if use_legacy else canonical({"url": target})
        auth["signature"] = sign(self.key, message)
        return auth

    # ------------------------------------------------------------------ waiting helpers

    async def wait_for_status(
        self, predicate: Callable[[dict[str, Any]], bool] = lambda _: True, timeout: float = 5.0
    ) -> dict[str, Any]:
        """The first recorded status report that satisfies ``predicate``."""
        return await self._wait_for(self.statuses, predicate, timeout)

    async def wait_for_delete(
        self, predicate: Callable[[dict[str, Any]], bool] = lambda _: True, timeout: float = 5.0
    ) -> dict[str, Any]:
        return await self._wait_for(self.deletes, predicate, timeout)

    async def _wait_for(
        self,
        records: list[dict[str, Any]],
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float,
    ) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((item for item in records if predicate(item)), None)

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: find() is not None), timeout)
            found = find()
            assert found is not None
            return found

    async def _record(self, records: list[dict[str, Any]], item: dict[str, Any]) -> None:
        async with self._changed:
            records.append(item)
            self._changed.notify_all()

    # ------------------------------------------------------------------ handlers

    @web.middleware
    async def _outage_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.hits[request.path] += 1
        if self.outage is Outage.ERROR_503:
            return web.json_response({"error": "autoscaler unavailable"}, status=503)
        return await handler(request)

    async def _pubkey(self, request: web.Request) -> web.StreamResponse:
        if not self.pubkey_ready:
            return web.Response(status=503, text="key not ready")
        self.pubkey_served_at.append(time.time())
        return web.Response(text=self.pem, content_type="text/plain")

    async def _worker_status(self, request: web.Request) -> web.StreamResponse:
        report = await request.json()
        if self.route_when_ready and report.get("loadtime") and not report.get("error_msg"):
            self.worker_url = report["url"]
        await self._record(self.statuses, {**report, "_at": time.time()})
        return web.json_response({"ok": True})

    async def _delete_requests(self, request: web.Request) -> web.StreamResponse:
        await self._record(self.deletes, {**await request.json(), "_at": time.time()})
        return web.json_response({"ok": True})

    def finished(self) -> list[dict[str, Any]]:
        """Every entry of every /delete_requests/ batch, in the order they came."""
        return [item for batch in list(self.deletes) for item in batch["requests"]]

    async def _route(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.routes.append(body)
        missing = [name for name in ("endpoint", "api_key", "cost") if name not in body]
        if missing:
            return web.json_response({"error": f"missing {', '.join(missing)}"}, status=400)
        if self.api_key is not None and body["api_key"] != self.api_key:
            return web.json_response({"error": "invalid api_key"}, status=401)
        if self.worker_url is None:
            # No worker ready: the client is expected to ask again with this request_idx.
            idx = body.get("request_idx")
            if not idx:
                self._request_idx += 1
                idx = self._request_idx
            return web.json_response({"request_idx": idx, "status": "WAITING"})
        auth = self.make_auth_data(
            cost=body["cost"],
            endpoint=body["endpoint"],
            request_idx=body.get("request_idx") or None,
        )
        auth["__request_id"] = uuid.uuid4().hex  # extra fields must not upset the worker
        self.routed.append({**auth, "_at": time.time()})
        return web.json_response(auth)


# --- the environment that points a worker at a fake -------------------------------------------
CONTAINER_ID = 4242
MASTER_TOKEN = "mt-e2e-secret"


def autoscaler_env(report_addr: str, port: int, **extra: Any) -> dict[str, Any]:
    """The variables a Vast instance gives the worker, pointing at a fake on `report_addr`;
    `port` is the worker's public port (mapped to itself)."""
    return {"REPORT_ADDR": report_addr, "CONTAINER_ID": CONTAINER_ID,
            "MASTER_TOKEN": MASTER_TOKEN, "PUBLIC_IPADDR": "127.0.0.1",
            f"VAST_TCP_PORT_{port}": port, "AUTOSCALER_REPORT_INTERVAL": "1", **extra}


# --- the fake autoscaler in its own thread -------------------------------------------------------
class ThreadedAutoscaler:
    """A FakeAutoscaler served by an event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="fake-autoscaler")
        self._thread.start()
        self.fakes: list[FakeAutoscaler] = []

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def new(self, **kwargs: Any) -> FakeAutoscaler:
        async def make() -> FakeAutoscaler:
            fake = FakeAutoscaler(**kwargs)
            # All fakes sign with the same key and the signature covers only the URL, so each
            # needs its own reqnum range or the worker rightly refuses a "replay".
            fake._reqnum = 100_000 * len(self.fakes)
            await fake.start()
            return fake

        fake = self.call(make())
        self.fakes.append(fake)
        return fake

    def close(self) -> None:
        for fake in self.fakes:
            self.call(fake.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)




@pytest_asyncio.fixture
async def fake_autoscaler() -> AsyncIterator[FakeAutoscaler]:
    fake = FakeAutoscaler()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
