"""What the ComfyUI at one URL is and can do, learned by asking it.

`Capabilities` is plain data; `learn` fills it in from ComfyUI itself:

- the version, from ``GET /system_stats`` (``system.comfyui_version``);
- the jobs API (``GET /api/jobs``: status and cancel by prompt id; newer than 0.3.64);
- whether a caller-chosen prompt id must be a canonical UUID (newer ComfyUI answers any other
  form with 400 ``invalid_prompt_id``). Asking would take a ``POST /prompt``, which a supervisor
  must not send to whatever holds the port after a restart; the rule and the jobs API live in
  the same ComfyUI module (``comfy_execution/jobs.py``), so the one is read from the other
  (an assumption; canonical ids, which this client always sends, work with every version);
- the server's feature flags (``GET /features``) and whether its asset database is on.

ComfyUI changes only when it restarts: learn once per start (`ComfyClient.capabilities` keeps
the answer until the client loses ComfyUI) and ask the object as often as you like.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from .errors import ComfyError
from .models import SystemStats


@dataclass(frozen=True)
class Capabilities:
    """What one ComfyUI said about itself."""

    version: str | None                 # system.comfyui_version ("0.3.64", "0.38.1-sim"), if told
    jobs_api: bool                      # GET/POST /api/jobs... exist
    canonical_prompt_ids: bool          # a chosen prompt_id must be a canonical UUID
    features: Mapping[str, Any] = field(default_factory=dict)  # GET /features ({} when absent)
    assets: bool = False                # the asset database is on (features["assets"])
    is_simulator: bool = False
    learned_at: float = 0.0             # time.time() when asked

    @property
    def version_tuple(self) -> tuple[int, ...] | None:
        """(0, 38, 1) for "0.38.1-sim"; None when the version is unknown or not numeric."""
        match = re.match(r"v?(\d+(?:\.\d+)*)", self.version or "")
        return tuple(int(part) for part in match.group(1).split(".")) if match else None

    def describe(self) -> str:
        """One line for a log or /health: "ComfyUI 0.38.1 (jobs API, assets on)"."""
        traits = ["jobs API" if self.jobs_api else "no jobs API",
                  f"assets {'on' if self.assets else 'off'}"]
        return f"ComfyUI {self.version or '(version not reported)'} ({', '.join(traits)})"

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "jobs_api": self.jobs_api,
                "canonical_prompt_ids": self.canonical_prompt_ids, "assets": self.assets,
                "features": dict(self.features)}


class Asks(Protocol):
    """What `learn` needs of a client (`ComfyClient` has it)."""

    async def system_stats(self, *, timeout: float | None = None) -> SystemStats: ...

    async def features(self, *, timeout: float | None = None) -> dict[str, Any]: ...

    async def has_jobs_api(self, *, timeout: float | None = None) -> bool: ...


async def learn(client: Asks, timeout: float = 5.0) -> Capabilities:
    """Ask ComfyUI what it is (three small GETs at once; ComfyError when it does not answer
    ``/system_stats``)."""
    stats, features, jobs_api = await asyncio.gather(
        client.system_stats(timeout=timeout), _optional(client.features(timeout=timeout), {}),
        _optional(client.has_jobs_api(timeout=timeout), False))
    return Capabilities(
        version=stats.comfyui_version or None, jobs_api=jobs_api, canonical_prompt_ids=jobs_api,
        features=features, assets=bool(features.get("assets", False)),
        is_simulator=stats.is_simulator, learned_at=time.time())


async def _optional(call: Any, default: Any) -> Any:
    """A question an older ComfyUI may not answer: its default instead of an error."""
    try:
        return await call
    except ComfyError:
        return default
