"""Webhook deliveries that survive receiver outages and worker restarts.

Each delivery is written to the spool directory (one JSON file, atomically) before its first
try and removed once it is delivered or has failed for good, so a crash or restart loses
nothing: the next ``start()`` sends what is left. Delivery is at least once: a crash between
the receiver's answer and the removal of the file sends it again, with the same
``X-Webhook-Delivery`` id so receivers can drop duplicates.

Client-chosen URLs are checked against non-public addresses (see ``api.host.netcheck``); the
operator's own ``WEBHOOK_URL`` is always trusted.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import random
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import aiohttp

from api.contract.request import MAX_SECONDS
from api.host.netcheck import (
    GuardedResolver,
    TargetError,
    TargetRefused,
    TargetUnresolvable,
    check_url,
    parse_http_url,
    redact_url,
)
from api.wrapper.s3 import RequestFieldError

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Webhook-Signature"
DELIVERY_HEADER = "X-Webhook-Delivery"
DEFAULT_TIMEOUT = 30.0
# A client may not hold a delivery slot open for longer than this per try.
MAX_TIMEOUT = MAX_SECONDS  # the request contract's bound (api.contract.request)
BODY_FIELDS = ("id", "status", "message", "output", "timings")
_SPOOL_VERSION = 1

__all__ = [
    "DeliveryResult",
    "DeliveryState",
    "RequestFieldError",
    "WebhookDispatcher",
    "WebhookSettings",
    "build_body",
    "check_webhook_url",
    "merge",
    "sign",
]


@dataclass(frozen=True, repr=False)
class WebhookSettings:
    """Where to POST a request's result. An empty ``url`` means no webhook."""

    url: str = ""
    timeout: float = DEFAULT_TIMEOUT
    secret: str = ""
    extra_params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> WebhookSettings:
        """``WEBHOOK_URL``, ``WEBHOOK_TIMEOUT`` (seconds) and ``WEBHOOK_SECRET`` from ``environ``."""
        raw_timeout = environ.get("WEBHOOK_TIMEOUT", "").strip()
        timeout = _parse_timeout(raw_timeout, "WEBHOOK_TIMEOUT") if raw_timeout else DEFAULT_TIMEOUT
        url = environ.get("WEBHOOK_URL", "").strip()
        if url:
            try:
                parse_http_url(url)
            except TargetRefused as exc:
                raise ValueError(f"WEBHOOK_URL: {exc}") from None
        return cls(url=url, timeout=timeout, secret=environ.get("WEBHOOK_SECRET", ""))

    def __repr__(self) -> str:
        return (
            f"WebhookSettings(url={redact_url(self.url) if self.url else ''!r}, timeout={self.timeout!r}, "
            f"secret={'<set>' if self.secret else '<unset>'!r}, "
            f"extra_params=<{len(self.extra_params)} key(s)>)"
        )


def _parse_timeout(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number of seconds")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_TIMEOUT:
        raise ValueError(f"{name} must be more than 0 and at most {MAX_TIMEOUT:g} seconds")
    return seconds


_WEBHOOK_FIELDS = ("url", "timeout", "secret", "extra_params")


def merge(env: WebhookSettings, request_block: Mapping[str, Any] | None) -> WebhookSettings:
    """The request's ``webhook`` block over the environment's settings, field by field.

    Non-empty request values win. One exception, on purpose: when the request points the
    webhook at a URL other than the operator's and brings no secret of its own, the operator's
    secret is not used, because signing client-chosen bodies for a client-chosen receiver
    would hand out valid signatures for the operator's own receiver.
    Raises RequestFieldError for malformed blocks.
    """
    if request_block is None:
        return env
    if not isinstance(request_block, Mapping):
        raise RequestFieldError("webhook", "must be an object")
    unknown = sorted(str(k) for k in request_block if k not in _WEBHOOK_FIELDS)
    if unknown:
        raise RequestFieldError(
            "webhook", f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(_WEBHOOK_FIELDS)}"
        )
    changes: dict[str, Any] = {}

    url = request_block.get("url")
    if url is not None:
        if not isinstance(url, str):
            raise RequestFieldError("webhook.url", f"must be a string, not {type(url).__name__}")
        if url.strip():
            try:
                parse_http_url(url)
            except TargetRefused as exc:
                raise RequestFieldError("webhook.url", str(exc)) from None
            changes["url"] = url.strip()

    timeout = request_block.get("timeout")
    if timeout is not None and timeout != "":
        try:
            changes["timeout"] = _parse_timeout(timeout, "timeout")
        except ValueError as exc:
            raise RequestFieldError("webhook.timeout", str(exc).removeprefix("timeout ")) from None

    secret = request_block.get("secret")
    if secret is not None:
        if not isinstance(secret, str):
            raise RequestFieldError("webhook.secret", f"must be a string, not {type(secret).__name__}")
        if secret:
            changes["secret"] = secret

    extra = request_block.get("extra_params")
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise RequestFieldError("webhook.extra_params", "must be an object")
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as exc:
            raise RequestFieldError("webhook.extra_params", f"must be plain JSON ({exc})") from None
        changes["extra_params"] = dict(extra)

    if "url" in changes and changes["url"] != env.url and "secret" not in changes:
        changes["secret"] = ""
    return replace(env, **changes) if changes else env


def sign(body: bytes, secret: str) -> str:
    """``sha256=<hex HMAC-SHA256 of the exact body bytes>``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def build_body(payload: Mapping[str, Any], extra_params: Mapping[str, Any]) -> bytes:
    """The exact bytes POSTed: the result's public fields plus ``extra``."""
    document = {name: payload.get(name) for name in BODY_FIELDS}
    document["extra"] = dict(extra_params)
    # default=str: a stray Path or datetime in an output must not cost the client its webhook.
    return json.dumps(document, separators=(",", ":"), default=str).encode("utf-8")


async def check_webhook_url(
    url: str, allow_private: bool = False, trusted_urls: Iterable[str] = ()
) -> str | None:
    """Why ``url`` cannot be a webhook target (a sentence for a 400), or None when it can.

    Resolves the host without blocking the loop. Trusted (operator) URLs only need to be
    well-formed.
    """
    try:
        if url.strip() in {u.strip() for u in trusted_urls}:
            parse_http_url(url)
        else:
            await check_url(url, allow_private)
    except TargetError as exc:
        return f"webhook url refused: {exc}"
    return None


class DeliveryState(enum.Enum):
    DELIVERED = "delivered"
    FAILED = "failed"  # a final answer from the receiver, or retries used up
    REFUSED = "refused"  # the target is not allowed
    EXPIRED = "expired"  # older than the spool's max age
    SPOOLED = "spooled"  # the dispatcher stopped; the next start() sends it
    DROPPED = "dropped"  # pushed out of a full spool (webhook.spool_max_bytes), oldest first


@dataclass(frozen=True)
class DeliveryResult:
    delivery_id: str
    request_id: str
    state: DeliveryState
    attempts: int
    status: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class SpooledDelivery:
    """Everything needed to send a webhook again after a restart (the signature, not the secret)."""

    delivery_id: str
    request_id: str
    url: str
    timeout: float
    body: bytes
    signature: str | None
    created_at: float

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": _SPOOL_VERSION,
                "delivery_id": self.delivery_id,
                "request_id": self.request_id,
                "url": self.url,
                "timeout": self.timeout,
                "signature": self.signature,
                "created_at": self.created_at,
                # build_body writes ASCII-only JSON, so the text round-trips to the same bytes.
                "body": self.body.decode("utf-8"),
            }
        ).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> SpooledDelivery:
        data = json.loads(raw)
        if data.get("version") != _SPOOL_VERSION:
            raise ValueError(f"unknown spool format version {data.get('version')!r}")
        return cls(
            delivery_id=str(data["delivery_id"]),
            request_id=str(data["request_id"]),
            url=str(data["url"]),
            timeout=float(data["timeout"]),
            body=str(data["body"]).encode("utf-8"),
            signature=data.get("signature"),
            created_at=float(data["created_at"]),
        )


class Spool:
    """One JSON file per pending delivery in one directory; writes are atomic (temp + rename)."""

    SUFFIX = ".json"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        #: delivery id -> bytes on disk, in the order written (oldest first)
        self.sizes: dict[str, int] = {}

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def over(self, max_bytes: int) -> list[str]:
        """The oldest delivery ids to drop so that the rest fit in ``max_bytes``."""
        excess = self.total_bytes - max_bytes
        dropped: list[str] = []
        for delivery_id, size in self.sizes.items():
            if excess <= 0:
                break
            dropped.append(delivery_id)
            excess -= size
        return dropped

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self.directory.glob(".*.tmp"):
            # A temp file is a write that never completed; its delivery was never started.
            leftover.unlink(missing_ok=True)

    def path_of(self, delivery_id: str) -> Path:
        return self.directory / f"{delivery_id}{self.SUFFIX}"

    def write(self, item: SpooledDelivery) -> None:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{item.delivery_id}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                data = item.to_json()
                handle.write(data)
                self.sizes[item.delivery_id] = len(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, self.path_of(item.delivery_id))
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def remove(self, delivery_id: str) -> None:
        self.path_of(delivery_id).unlink(missing_ok=True)
        self.sizes.pop(delivery_id, None)

    def load(self) -> tuple[list[SpooledDelivery], list[tuple[Path, str]]]:
        """Readable items, oldest first, and unreadable files with the reason."""
        items: list[SpooledDelivery] = []
        broken: list[tuple[Path, str]] = []
        for path in sorted(self.directory.glob(f"*{self.SUFFIX}")):
            try:
                raw = path.read_bytes()
                items.append(SpooledDelivery.from_json(raw))
                self.sizes[items[-1].delivery_id] = len(raw)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                broken.append((path, f"{type(exc).__name__}: {exc}"))
        items.sort(key=lambda item: item.created_at)
        self.sizes = {item.delivery_id: self.sizes[item.delivery_id] for item in items}
        return items, broken

    def set_aside(self, path: Path) -> None:
        # Kept for a human to look at, but out of the way of the next start().
        path.replace(path.with_suffix(".corrupt"))


@dataclass(frozen=True)
class _Attempt:
    delivered: bool
    retryable: bool
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    refused: bool = False


_RETRYABLE_STATUS = {408, 425, 429}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


#: Breaks ties between deliveries created in the same millisecond.
_SEQUENCE = itertools.count()


def _new_delivery_id(created_at: float) -> str:
    # Time, then this process's sequence: file names sort in submission order, even for
    # deliveries made in the same millisecond (a uuid alone ordered those by chance).
    return f"{int(created_at * 1000):013d}-{next(_SEQUENCE) % 10**8:08d}-{uuid.uuid4().hex[:16]}"


class WebhookDispatcher:
    """Sends webhooks in the background with retries, persisting each one until it is settled."""

    def __init__(
        self,
        spool_dir: Path,
        retries: int = 5,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        max_age: float = 86400.0,
        allow_private_targets: bool = False,
        trusted_urls: Iterable[str] | None = None,
        max_concurrent: int = 16,
        on_settled: Callable[[DeliveryResult], None] | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self._on_settled = on_settled
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        self.retries = retries
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_age = max_age
        self.allow_private_targets = allow_private_targets
        self._trusted = {u.strip() for u in (trusted_urls or ()) if u and u.strip()}
        self._spool = Spool(spool_dir)
        self.max_bytes = max_bytes
        #: deliveries given up because the spool was over max_bytes (for /health and metrics)
        self.dropped = 0
        self._by_id: dict[str, tuple[asyncio.Task[DeliveryResult], str]] = {}
        self._dropping: set[str] = set()
        self._max_concurrent = max_concurrent
        self._tasks: set[asyncio.Task[DeliveryResult]] = set()
        self._guarded_session: aiohttp.ClientSession | None = None
        self._open_session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._started = False
        self._closed = False

    @property
    def spool_dir(self) -> Path:
        return self._spool.directory

    @property
    def pending(self) -> int:
        """Deliveries in progress (including ones waiting to retry)."""
        return len(self._tasks)

    async def start(self) -> None:
        """Open HTTP sessions and resend whatever an earlier run left in the spool."""
        if self._started:
            raise RuntimeError("WebhookDispatcher.start() was already called")
        self._started = True
        await asyncio.to_thread(self._spool.prepare)
        self._slots = asyncio.Semaphore(self._max_concurrent)
        # Hosts of client-chosen URLs are checked again at connect time (DNS may change its
        # answer between the check and the connection); operator URLs skip the check.
        self._guarded_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=GuardedResolver()),
        )
        self._open_session = aiohttp.ClientSession()
        items, broken = await asyncio.to_thread(self._spool.load)
        for path, reason in broken:
            log.error("unreadable webhook spool file %s (%s); renamed to .corrupt", path, reason)
            await asyncio.to_thread(self._spool.set_aside, path)
        now = time.time()
        resumed = 0
        for item in items:
            age = now - item.created_at
            if age > self.max_age:
                log.warning(
                    "dropping spooled webhook %s for request %s: it is %.0fs old, past the max age of %.0fs",
                    item.delivery_id, item.request_id, age, self.max_age,
                )
                await asyncio.to_thread(self._spool.remove, item.delivery_id)
                continue
            self._launch(item, already_spooled=True)
            resumed += 1
        self._enforce_size()
        if resumed:
            log.info("resending %d spooled webhook(s) from %s", resumed, self.spool_dir)

    def submit(
        self, settings: WebhookSettings, payload: Mapping[str, Any], request_id: str
    ) -> asyncio.Task[DeliveryResult]:
        """Queue one webhook and return at once; the returned task settles with the outcome.

        The body is built here, so a later change to ``payload`` does not alter what is sent.
        """
        if not self._started:
            raise RuntimeError("call WebhookDispatcher.start() before submit()")
        if self._closed:
            raise RuntimeError("WebhookDispatcher is closed")
        if not settings.enabled:
            raise ValueError("webhook settings have no url; check settings.enabled first")
        body = build_body(payload, settings.extra_params)
        created_at = time.time()
        item = SpooledDelivery(
            delivery_id=_new_delivery_id(created_at),
            request_id=str(request_id),
            url=settings.url,
            timeout=settings.timeout,
            body=body,
            signature=sign(body, settings.secret) if settings.secret else None,
            created_at=created_at,
        )
        return self._launch(item, already_spooled=False)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait for the deliveries in progress; True when none is left within ``timeout``."""
        if not self._tasks:
            return True
        _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        return not pending

    async def close(self) -> None:
        """Stop all deliveries now; unfinished ones stay in the spool for the next start()."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for session in (self._guarded_session, self._open_session):
            if session is not None:
                await session.close()
        if tasks:
            log.info("webhook dispatcher closed; %d delivery(ies) left in %s", len(tasks), self.spool_dir)

    # -- one delivery ------------------------------------------------------------------------

    def _launch(self, item: SpooledDelivery, already_spooled: bool) -> asyncio.Task[DeliveryResult]:
        task = asyncio.create_task(
            self._deliver(item, already_spooled), name=f"webhook-{item.request_id}-{item.delivery_id}"
        )
        self._tasks.add(task)
        self._by_id[item.delivery_id] = (task, item.request_id)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _t: self._by_id.pop(item.delivery_id, None))
        return task

    def pending_requests(self) -> set[str]:
        """Request ids with a delivery not settled yet (its request's files stay meanwhile)."""
        return {request_id for _task, request_id in self._by_id.values()}

    @property
    def spool_bytes(self) -> int:
        return self._spool.total_bytes

    def _enforce_size(self) -> None:
        """Keep the spool within ``max_bytes``: give up the oldest deliveries, loudly."""
        if self.max_bytes is None:
            return
        for delivery_id in self._spool.over(self.max_bytes):
            task, request_id = self._by_id.get(delivery_id, (None, "?"))
            size = self._spool.sizes.get(delivery_id, 0)
            self._spool.remove(delivery_id)  # one unlink: small enough for the loop
            self.dropped += 1
            log.error(
                "webhook spool over %d bytes (webhook.spool_max_bytes): dropped the oldest "
                "delivery %s for request %s (%d bytes); it will not be sent", self.max_bytes,
                delivery_id, request_id, size)
            self._settled(DeliveryResult(delivery_id, request_id, DeliveryState.DROPPED, 0))
            if task is not None and not task.done():
                self._dropping.add(delivery_id)
                task.cancel()

    async def _deliver(self, item: SpooledDelivery, already_spooled: bool) -> DeliveryResult:
        try:
            if not already_spooled:
                try:
                    await asyncio.to_thread(self._spool.write, item)
                except OSError as exc:
                    # Still worth sending; it just will not survive a restart.
                    log.error(
                        "cannot spool webhook for request %s in %s (%s); sending without a safety copy",
                        item.request_id, self.spool_dir, exc,
                    )
                self._enforce_size()
            result = await self._attempt_until_settled(item)
        except asyncio.CancelledError:
            if item.delivery_id in self._dropping:
                self._dropping.discard(item.delivery_id)
                return DeliveryResult(item.delivery_id, item.request_id, DeliveryState.DROPPED, 0)
            # Our own close(): the file stays for the next start(). Ending normally lets
            # callers awaiting the task see why it stopped.
            log.info(
                "webhook %s for request %s left in the spool (dispatcher stopping)",
                item.delivery_id, item.request_id,
            )
            return DeliveryResult(item.delivery_id, item.request_id, DeliveryState.SPOOLED, 0)
        try:
            await asyncio.to_thread(self._spool.remove, item.delivery_id)
        except OSError as exc:
            log.error("cannot remove settled webhook %s from the spool: %s", item.delivery_id, exc)
        self._settled(result)
        return result

    def _settled(self, result: DeliveryResult) -> None:
        if self._on_settled is not None:
            try:
                self._on_settled(result)
            except Exception:
                log.exception("webhook on_settled callback failed")

    async def _attempt_until_settled(self, item: SpooledDelivery) -> DeliveryResult:
        where = redact_url(item.url)
        trusted = self.allow_private_targets or item.url.strip() in self._trusted
        attempt = 0
        while True:
            age = time.time() - item.created_at
            if age > self.max_age:
                log.warning(
                    "giving up on webhook %s for request %s to %s: older than the max age of %.0fs",
                    item.delivery_id, item.request_id, where, self.max_age,
                )
                return DeliveryResult(item.delivery_id, item.request_id, DeliveryState.EXPIRED, attempt)
            attempt += 1
            outcome = await self._attempt(item, trusted)
            if outcome.delivered:
                log.info(
                    "webhook for request %s delivered to %s (HTTP %s, attempt %d)",
                    item.request_id, where, outcome.status, attempt,
                )
                return DeliveryResult(
                    item.delivery_id, item.request_id, DeliveryState.DELIVERED, attempt, outcome.status
                )
            if outcome.refused:
                log.warning("webhook for request %s not sent: %s", item.request_id, outcome.error)
                return DeliveryResult(
                    item.delivery_id, item.request_id, DeliveryState.REFUSED, attempt, None, outcome.error
                )
            if not outcome.retryable:
                log.warning(
                    "webhook for request %s to %s failed for good: %s",
                    item.request_id, where, outcome.error,
                )
                return DeliveryResult(
                    item.delivery_id, item.request_id, DeliveryState.FAILED, attempt, outcome.status, outcome.error
                )
            if attempt > self.retries:
                log.error(
                    "webhook for request %s to %s failed after %d attempt(s): %s",
                    item.request_id, where, attempt, outcome.error,
                )
                return DeliveryResult(
                    item.delivery_id, item.request_id, DeliveryState.FAILED, attempt, outcome.status, outcome.error
                )
            delay = self._delay(attempt, outcome.retry_after)
            log.info(
                "webhook for request %s to %s: attempt %d failed (%s); retrying in %.1fs",
                item.request_id, where, attempt, outcome.error, delay,
            )
            await asyncio.sleep(delay)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max)
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** (attempt - 1))
        # Half fixed, half random: spreads a burst of retries without ever waiting ~0.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def _attempt(self, item: SpooledDelivery, trusted: bool) -> _Attempt:
        if not trusted:
            try:
                await check_url(item.url, allow_private=False)
            except TargetUnresolvable as exc:
                return _Attempt(delivered=False, retryable=True, error=str(exc))
            except TargetRefused as exc:
                return _Attempt(delivered=False, retryable=False, refused=True, error=str(exc))
        session = self._open_session if trusted else self._guarded_session
        assert session is not None and self._slots is not None
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "comfy-worker-webhook/1",
            DELIVERY_HEADER: item.delivery_id,
        }
        if item.signature:
            headers[SIGNATURE_HEADER] = item.signature
        async with self._slots:
            try:
                async with session.post(
                    item.url,
                    data=item.body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=item.timeout),
                    # A redirect could lead anywhere, including a private address.
                    allow_redirects=False,
                ) as response:
                    status = response.status
                    retry_after_header = response.headers.get("Retry-After")
            except (asyncio.TimeoutError, TimeoutError):
                return _Attempt(False, True, error=f"no answer within {item.timeout:g}s")
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, TargetRefused):
                    return _Attempt(False, False, refused=True, error=str(exc.os_error))
                return _Attempt(False, True, error=f"cannot connect ({exc.os_error.strerror or exc.os_error})")
            except aiohttp.ClientError as exc:
                return _Attempt(False, True, error=f"{type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            return _Attempt(True, False, status=status)
        if 300 <= status < 400:
            return _Attempt(False, False, status=status, error=f"HTTP {status} (redirects are not followed)")
        if status >= 500 or status in _RETRYABLE_STATUS:
            retry_after = parse_retry_after(retry_after_header) if status in (429, 503) else None
            return _Attempt(False, True, status=status, error=f"HTTP {status}", retry_after=retry_after)
        return _Attempt(False, False, status=status, error=f"HTTP {status}")
