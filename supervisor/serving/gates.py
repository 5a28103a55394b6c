"""Who may use the public port: the autoscaler's signature, a bearer token, or nobody checks.

There is no silent open mode: with neither REPORT_ADDR nor WORKER_AUTH_TOKEN set, the worker
starts only when UNSECURED=true says so (and logs a warning).
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admitted:
    payload: dict[str, Any]          # what goes to the wrapper: {"input": {...}}
    request_idx: int | None = None   # the autoscaler's id for the request
    session: str | None = None       # the autoscaler session the request runs in


class Rejected(Exception):
    """A request refused at the door; `status` is 401, 410 or 422, `reason` says why.

    `refused` is the request as far as it was read (its request_idx), when it is to be reported
    as refused (a bad signature is; a malformed envelope or a replay is not)."""

    def __init__(self, status: int, reason: str, refused: Admitted | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.refused = refused


def split_body(body: Any) -> tuple[dict[str, Any] | None, Any]:
    """(auth_data, payload) for the autoscaler's envelope, (None, body) for a plain request."""
    if isinstance(body, dict) and ("auth_data" in body or "payload" in body) and \
            "input" not in body:
        missing = [k for k in ("auth_data", "payload") if k not in body]
        if missing:
            raise Rejected(422, "missing fields: " + ", ".join(missing))
        if not isinstance(body["payload"], dict):
            raise Rejected(422, "payload must be an object like {\"input\": {...}}")
        auth = body["auth_data"]
        if auth is not None and not isinstance(auth, dict):
            raise Rejected(422, "auth_data must be an object")
        return auth, body["payload"]
    return None, body


class Gate(Protocol):
    name: str

    def admit(self, request: web.Request, body: Any) -> Admitted: ...


class OpenGate:
    """UNSECURED=true: anyone on the network may send work."""

    name = "unsecured"

    def admit(self, request: web.Request, body: Any) -> Admitted:
        _, payload = split_body(body)
        return Admitted(payload if isinstance(payload, dict) else {"input": payload})


class TokenGate:
    """Standalone: `Authorization: Bearer <WORKER_AUTH_TOKEN>`, compared in constant time."""

    name = "token"

    def __init__(self, token: str):
        self._token = token.encode()

    def admit(self, request: web.Request, body: Any) -> Admitted:
        self.check(request)
        _, payload = split_body(body)
        return Admitted(payload if isinstance(payload, dict) else {"input": payload})

    def check(self, request: web.Request) -> None:
        """Raise Rejected unless the request carries the token."""
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Rejected(401, "missing bearer token: send 'Authorization: Bearer <token>'")
        # Header bytes that are not UTF-8 arrive as surrogates: compare them as the raw bytes.
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                                   self._token):
            raise Rejected(401, "invalid bearer token")
