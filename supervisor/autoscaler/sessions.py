"""Sessions: one worker kept for several requests of one client, as the vastai SDK serves them.

Facts of the SDK (`vastai/serverless/server/lib/backend.py`, `session_*_handler`,
`__close_session`, `__session_gc_loop`):

* `POST /session/create` with the routed `auth_data` and `payload` `{lifetime (60 s),
  on_close_route, on_close_payload}` answers 201 `{session_id (13 letters and digits),
  expiration}`; past `max_sessions` open ones, 429. The session is tracked like a request of
  its own (its request_idx): it holds its workload in `cur_load` and `working_request_idxs`
  until it closes, and is then reported Success.
* A request with `session_id` runs in it: an unknown id is 410 `{"error": "invalid session"}`,
  checked before the signature; each request extends the session by its lifetime
  (`expiration += lifetime`, cumulatively). Its work counts in `new_load` and `cur_perf` only.
* `POST /session/end|get|health` take `{session_id, session_auth}`, where `session_auth` must be
  the session's `auth_data` exactly. Ending cancels the session's requests in flight, posts
  `on_close_payload` (with `session_id`) to `on_close_route` on the model server, best effort.
* Expired sessions are closed every 5 s.

What comfy-worker does more: the session's auth_data must carry a valid signature (the SDK
checks none at create), and a request in a session must carry the session's own auth_data.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

logger = logging.getLogger(__name__)

DEFAULT_LIFETIME = 60.0
GC_INTERVAL = 5.0
_ID_CHARACTERS = string.ascii_letters + string.digits


def new_session_id() -> str:
    return "".join(secrets.choice(_ID_CHARACTERS) for _ in range(13))


@dataclass
class Session:
    session_id: str
    auth_data: dict[str, Any]          # the routed auth_data, exactly as it came
    request_idx: int
    lifetime: float
    expiration: float
    created_at: float
    on_close_route: str | None = None
    on_close_payload: Any = None
    requests: set[asyncio.Task] = field(default_factory=set)

    def view(self) -> dict[str, Any]:
        """The body of /session/get."""
        return {"session_id": self.session_id, "auth_data": self.auth_data,
                "lifetime": self.lifetime, "expiration": self.expiration,
                "created_at": self.created_at, "on_close_route": self.on_close_route,
                "on_close_payload": self.on_close_payload}


class SessionLimit(Exception):
    """`max_sessions` are open already."""


class Sessions:
    """The open sessions; `on_open` and `on_close` tell the reports, `on_close_call` runs a
    session's on_close_route."""

    def __init__(self, max_sessions: int, *,
                 on_open: Callable[[Session], None] = lambda s: None,
                 on_close: Callable[[Session], None] = lambda s: None,
                 on_close_call: Callable[[Session], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.time):
        self.max_sessions = max_sessions
        self.on_open = on_open
        self.on_close = on_close
        self.on_close_call = on_close_call
        self._clock = clock
        self._open: dict[str, Session] = {}
        self._gc: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._open)

    def get(self, session_id: str) -> Session | None:
        return self._open.get(session_id)

    def create(self, auth_data: dict[str, Any], request_idx: int, payload: dict[str, Any]
               ) -> Session:
        if self.max_sessions and len(self._open) >= self.max_sessions:
            raise SessionLimit(f"{len(self._open)} sessions are open, the most this worker "
                               f"keeps (autoscaler.max_sessions = {self.max_sessions})")
        now = self._clock()
        lifetime = float(payload.get("lifetime", DEFAULT_LIFETIME))
        session = Session(new_session_id(), auth_data, request_idx, lifetime, now + lifetime,
                          now, payload.get("on_close_route"), payload.get("on_close_payload"))
        self._open[session.session_id] = session
        self.on_open(session)
        logger.info("session %s opened for request_idx %s (lifetime %g s)", session.session_id,
                    request_idx, lifetime)
        return session

    def extend(self, session: Session) -> None:
        """A request runs in the session: it lives one lifetime longer."""
        session.expiration += session.lifetime

    async def close(self, session_id: str, why: str) -> bool:
        """Close a session: cancel its requests in flight, call its on_close_route, report it.
        False when it was not open."""
        session = self._open.pop(session_id, None)
        if session is None:
            return False
        logger.info("session %s closed (%s)", session_id, why)
        current = asyncio.current_task()
        running = [t for t in session.requests if t is not current and not t.done()]
        for task in running:
            task.cancel()
        session.requests.clear()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        if self.on_close_call is not None and session.on_close_route:
            try:
                await self.on_close_call(session)
            except Exception as exc:  # best effort, as in the SDK
                logger.warning("session %s: on_close_route %s failed: %s", session_id,
                               session.on_close_route, exc)
        self.on_close(session)
        return True

    # --- expiry ---------------------------------------------------------------------------------
    def start(self, interval: float = GC_INTERVAL) -> None:
        self._gc = asyncio.create_task(self._expire_loop(interval), name="autoscaler-sessions")

    async def stop(self) -> None:
        if self._gc is not None:
            self._gc.cancel()
            await asyncio.gather(self._gc, return_exceptions=True)

    async def expire(self) -> int:
        now = self._clock()
        expired = [sid for sid, s in self._open.items() if s.expiration <= now]
        for sid in expired:
            await self.close(sid, "expired")
        return len(expired)

    async def _expire_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.expire()
            except Exception:  # one bad close must not end expiry for good
                logger.exception("closing expired sessions failed")
