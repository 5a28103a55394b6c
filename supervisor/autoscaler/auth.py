"""Checking that a request really was routed here by the autoscaler.

Protocol facts (public vastai SDK, server library):

* A routed request's body is ``{"auth_data": {...}, "payload": {...}}``; ``auth_data`` has
  ``cost``, ``endpoint``, ``reqnum``, ``request_idx``, ``signature`` and ``url``. A missing
  field is answered with 422, a bad signature with 401.
* The signature is RSA PKCS#1 v1.5 over SHA-256, base64-encoded. The signed message is
  ``json.dumps({"url": auth_data["url"]}, indent=4, sort_keys=True)`` encoded as UTF-8.
* Older autoscalers signed every ``auth_data`` field except ``signature``, serialised the same
  way; the oldest of them had no ``request_idx``. Accepting those is opt-in (``legacy=True``).

Because the current format signs only the worker URL, the signature is the same for every
request routed to one worker and ``reqnum`` is not covered by it. The :class:`ReplayGuard`
therefore refuses an exact repeat of (signature, reqnum) but cannot stop a forged ``reqnum``;
checking ``url`` against this worker's own public URL (``expected_url``) at least stops a
signature issued for another worker from being used here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from .errors import AuthError
from .pubkey import PublicKeyFetcher, load_public_key

__all__ = [
    "REQUIRED_AUTH_FIELDS",
    "AuthData",
    "AuthError",
    "KeySource",
    "PublicKeyFetcher",
    "ReplayGuard",
    "RequestAuthenticator",
    "legacy_messages",
    "load_public_key",
    "parse_auth_data",
    "parse_envelope",
    "signed_message",
    "verify",
]

log = logging.getLogger(__name__)

REQUIRED_AUTH_FIELDS: tuple[str, ...] = (
    "cost",
    "endpoint",
    "reqnum",
    "request_idx",
    "signature",
    "url",
)


@dataclass(frozen=True)
class AuthData:
    """A well-formed ``auth_data`` object, with its numbers parsed."""

    cost: float
    endpoint: str
    reqnum: int
    request_idx: int
    signature: str
    url: str


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def parse_auth_data(auth_data: Mapping[str, Any]) -> AuthData:
    """Check that every field is present and has a usable type; 422 otherwise.

    Missing fields are reported before wrong types, all of each kind in one message, so a
    client sees everything it must fix at once.
    """
    missing = [name for name in REQUIRED_AUTH_FIELDS if auth_data.get(name) is None]
    if missing:
        raise AuthError(422, "missing fields: " + ", ".join(missing))

    invalid: list[str] = []
    cost = _as_float(auth_data["cost"])
    if cost is None:
        invalid.append("cost (expected a number)")
    reqnum = _as_int(auth_data["reqnum"])
    if reqnum is None:
        invalid.append("reqnum (expected an integer)")
    request_idx = _as_int(auth_data["request_idx"])
    if request_idx is None:
        invalid.append("request_idx (expected an integer)")
    for name in ("endpoint", "signature", "url"):
        if not isinstance(auth_data[name], str):
            invalid.append(f"{name} (expected a string)")
    if invalid or cost is None or reqnum is None or request_idx is None:
        raise AuthError(422, "invalid fields: " + ", ".join(invalid))
    return AuthData(
        cost=cost,
        endpoint=auth_data["endpoint"],
        reqnum=reqnum,
        request_idx=request_idx,
        signature=auth_data["signature"],
        url=auth_data["url"],
    )


def _serialise(message: Mapping[str, Any]) -> bytes:
    # The exact text the autoscaler signs: four-space indent, keys sorted, ASCII escapes.
    return json.dumps(message, indent=4, sort_keys=True).encode("utf-8")


def signed_message(auth_data: Mapping[str, Any]) -> bytes:
    """The bytes the current autoscaler signs: only the worker URL."""
    return _serialise({"url": auth_data["url"]})


def legacy_messages(auth_data: Mapping[str, Any]) -> list[bytes]:
    """The bytes older autoscalers signed, newest layout first.

    Values are taken as they arrived (not parsed), because that is what was signed.
    """
    fields = {name: auth_data[name] for name in REQUIRED_AUTH_FIELDS if name != "signature"}
    without_idx = {name: value for name, value in fields.items() if name != "request_idx"}
    return [_serialise(fields), _serialise(without_idx)]


def _signature_matches(key: RSAPublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def verify(
    auth_data: Mapping[str, Any],
    key: RSAPublicKey | None,
    *,
    legacy: bool,
    expected_url: str | None = None,
) -> AuthData:
    """Return the parsed ``auth_data`` when its signature is good; raise :class:`AuthError`.

    422 for missing or malformed fields; 401 when the key is not fetched yet, when the
    signature does not verify, or when ``expected_url`` is given and the signed URL differs.
    """
    parsed = parse_auth_data(auth_data)
    if key is None:
        raise AuthError(401, "public key not yet fetched", parsed)
    try:
        signature = base64.b64decode(parsed.signature)
    except (binascii.Error, ValueError):
        raise AuthError(401, "invalid signature", parsed) from None

    candidates = [signed_message(auth_data)]
    if legacy:
        candidates.extend(legacy_messages(auth_data))
    if not any(_signature_matches(key, signature, message) for message in candidates):
        log.debug("signature check failed for reqnum %s (url %s)", parsed.reqnum, parsed.url)
        raise AuthError(401, "invalid signature", parsed)

    if expected_url is not None and parsed.url.rstrip("/") != expected_url.rstrip("/"):
        raise AuthError(401, "request was signed for another worker", parsed)
    return parsed


class ReplayGuard:
    """Refuses a (signature, reqnum) pair seen within the last ``window`` seconds.

    Memory is bounded: at most ``max_entries`` pairs are kept (oldest dropped first), each as a
    16-byte digest rather than the signature itself.
    """

    def __init__(
        self,
        window: float = 600.0,
        max_entries: int = 50_000,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window <= 0 or max_entries < 1:
            raise ValueError("window must be positive and max_entries at least 1")
        self._window = window
        self._max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_remember(self, signature: str, reqnum: int) -> None:
        """Raise 401 "replayed request" for a repeat; otherwise remember the pair."""
        now = self._clock()
        self._expire(now)
        digest = hashlib.blake2b(
            f"{reqnum}\0{signature}".encode("utf-8"), digest_size=16
        ).digest()
        if digest in self._seen:
            raise AuthError(401, "replayed request")
        self._seen[digest] = now
        while len(self._seen) > self._max_entries:
            self._seen.popitem(last=False)

    def _expire(self, now: float) -> None:
        # Entries are inserted in time order, so the stale ones are all at the front.
        cutoff = now - self._window
        while self._seen:
            oldest, seen_at = next(iter(self._seen.items()))
            if seen_at > cutoff:
                break
            del self._seen[oldest]


def parse_envelope(body: Any) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Split a request body into ``(auth_data, payload)``.

    The wrapped shape ``{"auth_data": {...}, "payload": {...}}`` gives both; a body with
    neither key is the bare shape and comes back as ``(None, body)``. Raises 422 when the body
    or the payload is not a JSON object, the payload is missing, or ``auth_data`` is not an
    object.
    """
    if not isinstance(body, dict):
        raise AuthError(422, "request body must be a JSON object")
    if "auth_data" not in body and "payload" not in body:
        return None, body
    if "payload" not in body:
        raise AuthError(422, "payload: field missing")
    payload = body["payload"]
    if not isinstance(payload, dict):
        raise AuthError(422, "payload must be a JSON object")
    auth_data = body.get("auth_data")
    if auth_data is not None and not isinstance(auth_data, dict):
        raise AuthError(422, "auth_data must be a JSON object")
    return auth_data, payload


class KeySource(Protocol):
    """Anything with a ``key`` that is ``None`` until known (e.g. :class:`PublicKeyFetcher`)."""

    @property
    def key(self) -> RSAPublicKey | None: ...


class RequestAuthenticator:
    """One place that applies the autoscaler's rules to a request's ``auth_data``.

    * ``unsecured`` (``UNSECURED=true``): no signature check; ``auth_data`` is optional, but
      when given it must be well formed (its ``request_idx`` and ``cost`` feed the reports).
    * otherwise: ``auth_data`` is required (401 without it), must verify, and must not be a
      replay.
    """

    def __init__(
        self,
        keys: KeySource,
        *,
        legacy: bool = False,
        unsecured: bool = False,
        replay_guard: ReplayGuard | None = None,
        expected_url: str | None = None,
    ) -> None:
        self._keys = keys
        self._legacy = legacy
        self._unsecured = unsecured
        self._replay = replay_guard if replay_guard is not None else ReplayGuard()
        self._expected_url = expected_url

    @property
    def unsecured(self) -> bool:
        return self._unsecured

    def authenticate(self, auth_data: Mapping[str, Any] | None, *,
                     replay: bool = True) -> AuthData | None:
        """The verified ``auth_data``, ``None`` for an allowed bare request; or AuthError.

        ``replay=False`` skips the replay guard: the requests of a session all carry the
        session's own auth_data, as the autoscaler routed it once."""
        if self._unsecured:
            return None if auth_data is None else parse_auth_data(auth_data)
        if auth_data is None:
            raise AuthError(401, "missing auth_data")
        parsed = verify(
            auth_data, self._keys.key, legacy=self._legacy, expected_url=self._expected_url
        )
        if replay:
            # Only verified pairs are remembered, so unsigned junk cannot fill the guard.
            try:
                self._replay.check_and_remember(parsed.signature, parsed.reqnum)
            except AuthError:
                raise AuthError(401, "replayed request") from None
        return parsed
