"""What the daemon needs of its optional partner that lives behind a lazy import.

The autoscaler link (supervisor.autoscaler.link.AutoscalerLink) brings in `cryptography`, so it
is imported only in autoscaler mode (supervisor/daemon/wiring.py); the daemon knows it by this
Protocol.
"""

from __future__ import annotations

from typing import Callable, Protocol

from aiohttp import web

from supervisor.serving.gates import Gate
from supervisor.serving.public import RequestHooks
from supervisor.state import Readiness


class Autoscaler(Protocol):
    #: The auth_data fields a routed request must carry (the public OpenAPI document lists them).
    required_auth_fields: tuple[str, ...]
    #: The workload of one request (autoscaler.workload).
    workload: float
    #: Called when the autoscaler asks for an update (POST /pyworker/update).
    on_update: Callable[[], None]
    #: The model server's base URL (a session's on_close_route is a path on it).
    model_server: Callable[[], str | None]

    async def start(self, readiness: Callable[[], Readiness],
                    disk_used: Callable[[], float | None] | None = None) -> None: ...

    async def stop(self) -> None: ...

    def state_changed(self) -> None:
        """The worker's state or capacity changed: report it."""

    def start_failed(self, reason: str) -> None:
        """The worker cannot start: the last report says why."""

    def hooks(self) -> RequestHooks: ...

    def gate(self) -> Gate: ...

    def routes(self) -> list[web.RouteDef]:
        """The routes it serves on the public port besides the work (sessions, update)."""
