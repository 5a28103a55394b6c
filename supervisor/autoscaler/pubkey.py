"""Fetching the autoscaler's public key in the background.

Requests routed by the autoscaler carry a signature made with its private key; the matching
public key is served as PEM text at ``{REPORT_ADDR}/pubkey/``. The worker must not wait for it
to start serving its health endpoints, so the key is fetched by a background task that retries
with exponential backoff (each comma-separated address in turn) until one answers with a key.
Until then :attr:`PublicKeyFetcher.key` is ``None`` and secured requests are refused with 401.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence

import aiohttp
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .failures import FailureLog, wait_event

log = logging.getLogger(__name__)


def load_public_key(text: str) -> RSAPublicKey:
    """Parse the body of ``/pubkey/``; raises ``ValueError`` when it is not an RSA PEM key."""
    body = text.strip()
    if body.startswith('"'):
        # Tolerate a JSON-encoded string: the PEM with its newlines escaped.
        body = str(json.loads(body)).strip()
    key = load_pem_public_key(body.encode("utf-8"))
    if not isinstance(key, RSAPublicKey):
        raise ValueError(f"expected an RSA public key, got {type(key).__name__}")
    return key


class PublicKeyFetcher:
    """Background task that fetches ``{addr}/pubkey/`` until it gets a usable key.

    Give it the worker's shared ``aiohttp.ClientSession``; it never closes it. The key is
    fetched once per process, as the vastai SDK does; there is no rotation in the protocol.
    """

    def __init__(
        self,
        report_addrs: Sequence[str],
        session: aiohttp.ClientSession,
        *,
        initial_backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float = 10.0,
        failure_log_every: int = 10,
        on_key: Callable[[], None] | None = None,
    ) -> None:
        if not report_addrs:
            raise ValueError("report_addrs is empty; pass at least one autoscaler address")
        self._addrs = tuple(addr.rstrip("/") for addr in report_addrs)
        self._session = session
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._failures = FailureLog(log, "fetching the autoscaler public key", failure_log_every)
        self._key: RSAPublicKey | None = None
        self._got_key = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_key = on_key
        self.attempts = 0

    @property
    def key(self) -> RSAPublicKey | None:
        """The autoscaler's key, or ``None`` while it has not been fetched yet."""
        return self._key

    def start(self) -> None:
        """Start the background fetch; calling it again while it runs does nothing."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="autoscaler-pubkey")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def wait_for_key(self, timeout: float | None = None) -> RSAPublicKey | None:
        """The key once fetched, or ``None`` if ``timeout`` seconds pass first."""
        await wait_event(self._got_key, timeout)
        return self._key

    async def _run(self) -> None:
        backoff = self._initial_backoff
        while True:
            for addr in self._addrs:
                key = await self._fetch_once(addr)
                if key is not None:
                    self._key = key
                    self._got_key.set()
                    self._failures.succeeded()
                    log.info("autoscaler public key fetched from %s", addr)
                    if self._on_key is not None:
                        self._on_key()
                    return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _fetch_once(self, addr: str) -> RSAPublicKey | None:
        url = f"{addr}/pubkey/"
        self.attempts += 1
        try:
            async with self._session.get(url, timeout=self._timeout) as resp:
                text = await resp.text()
                if resp.status != 200:
                    self._failures.failed(f"{url} answered HTTP {resp.status}")
                    return None
            return load_public_key(text)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self._failures.failed(f"{url}: {type(exc).__name__}: {exc}")
        except ValueError as exc:
            self._failures.failed(f"{url} did not return an RSA PEM key: {exc}")
        return None
