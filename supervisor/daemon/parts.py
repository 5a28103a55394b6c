"""What the daemon needs of its optional partner that lives behind a lazy import.

The autoscaler link (supervisor.autoscaler.link.AutoscalerLink) brings in `cryptography`, so it
is imported only in autoscaler mode (supervisor/daemon/wiring.py); the daemon knows it by this
Protocol.
"""

from __future__ import annotations

from typing import Callable, Protocol

from supervisor.serving.gates import Gate
from supervisor.serving.public import RequestHooks
from supervisor.state import Readiness


class Autoscaler(Protocol):
    #: The auth_data fields a routed request must carry (the public OpenAPI document lists them).
    required_auth_fields: tuple[str, ...]

    async def start(self, readiness: Callable[[], Readiness]) -> None: ...

    async def stop(self) -> None: ...

    def state_changed(self) -> None:
        """The worker's state or capacity changed: report it."""

    def hooks(self) -> RequestHooks: ...

    def gate(self) -> Gate: ...
