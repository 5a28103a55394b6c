"""The routes the vastai SDK's worker serves besides the work itself: sessions and updates.

* `POST /session/create|end|get|health` (see `supervisor.autoscaler.sessions`), with the
  SDK's answers: 201/429 for create; 422 (no session_id), 400 (no such session), 401
  (session_auth differs), 410 (closed meanwhile) and 200 for end and get; 200 `{"ok": bool}`
  for health.
* `POST /pyworker/update` with `Authorization: Bearer <MASTER_TOKEN>` (the bare token too, as
  the SDK takes it): the worker drains, finishes what runs, and exits for its service manager
  to restart it, updated. Without the token, or when MASTER_TOKEN is unset, 401: the SDK lets an
  empty token through; this worker does not.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Callable

from aiohttp import web

from .auth import RequestAuthenticator
from .errors import AuthError
from .sessions import Session, SessionLimit, Sessions

logger = logging.getLogger(__name__)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _json_object(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(422, "invalid JSON")
    if not isinstance(body, dict):
        return _error(422, "the body must be a JSON object")
    return body


class WorkerRoutes:
    """Session and update routes; `rejected(request_idx)` reports a session refused at the
    limit, `update()` starts the drain-and-restart."""

    def __init__(self, sessions: Sessions, authenticator: RequestAuthenticator, *,
                 master_token: str, rejected: Callable[[int | None], None],
                 update: Callable[[], None]):
        self.sessions = sessions
        self.authenticator = authenticator
        self.master_token = master_token
        self.rejected = rejected
        self.update = update

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/session/create", self.create), web.post("/session/end", self.end),
                web.post("/session/get", self.get), web.post("/session/health", self.health),
                web.post("/pyworker/update", self.pyworker_update)]

    # --- sessions -------------------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        auth_data, payload = body.get("auth_data"), body.get("payload")
        if not isinstance(auth_data, dict) or not isinstance(payload, dict):
            return _error(422, "a session is created with {\"auth_data\": {...}, "
                               "\"payload\": {\"lifetime\": seconds}}")
        lifetime = payload.get("lifetime", 60.0)
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or lifetime <= 0:
            return _error(422, "payload.lifetime: expected a positive number of seconds")
        try:
            parsed = self.authenticator.authenticate(auth_data)
        except AuthError as exc:
            return _error(exc.status, exc.reason)
        request_idx = parsed.request_idx if parsed is not None else auth_data.get("request_idx")
        try:
            session = self.sessions.create(auth_data, request_idx, payload)
        except SessionLimit as exc:
            self.rejected(request_idx)
            return _error(429, str(exc))
        return web.json_response({"session_id": session.session_id,
                                  "expiration": session.expiration}, status=201)

    async def _session(self, request: web.Request, missing: int,
                       missing_body: Callable[[str], dict[str, Any]]) -> Session | web.Response:
        """The session the body names, its session_auth checked; else the answer to give."""
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        session_id = body.get("session_id")
        if not session_id or not isinstance(session_id, str):
            return _error(422, "missing session_id")
        session = self.sessions.get(session_id)
        if session is None:
            return web.json_response(missing_body(session_id), status=missing)
        if body.get("session_auth") != session.auth_data:
            return _error(401, "session_auth is not valid")
        return session

    async def end(self, request: web.Request) -> web.Response:
        found = await self._session(
            request, 400, lambda sid: {"error": f"session with id {sid} not found"})
        if isinstance(found, web.Response):
            return found
        if not await self.sessions.close(found.session_id, "the client ended it"):
            return _error(410, "session already closed")
        return web.json_response({"ended": True, "removed_session": found.session_id})

    async def get(self, request: web.Request) -> web.Response:
        found = await self._session(request, 400, lambda sid: {"error": "session does not exist"})
        if isinstance(found, web.Response):
            return found
        return web.json_response(found.view())

    async def health(self, request: web.Request) -> web.Response:
        found = await self._session(request, 200, lambda sid: {"ok": False})
        if isinstance(found, web.Response):
            return found
        return web.json_response({"ok": True})

    # --- update ---------------------------------------------------------------------------------
    async def pyworker_update(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        token = header[len("Bearer "):] if header.startswith("Bearer ") else header
        if not self.master_token or not hmac.compare_digest(
                token.strip().encode("utf-8", "surrogateescape"), self.master_token.encode()):
            return _error(401, "unauthorized")
        logger.warning("POST /pyworker/update: draining, then exiting for the service manager "
                       "to restart the worker")
        self.update()
        return web.json_response({"ok": True, "message": "the worker takes no new work, "
                                  "finishes what runs, then exits to be restarted"})
