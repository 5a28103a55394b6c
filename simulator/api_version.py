"""Which ComfyUI API the simulator speaks: 0.3.64 (the default) or the newest one read (0.38.1).

Chosen with ``--api-version``; the ``SIM_API_VERSION`` environment variable sets the default,
so a whole test run can switch without touching any command line.
"""

from __future__ import annotations

import enum
import os
from typing import Mapping

ENV_VAR = "SIM_API_VERSION"


class ApiVersion(str, enum.Enum):
    V0_3_64 = "0.3.64"
    V0_38_1 = "0.38.1"

    @property
    def label(self) -> str:
        """The ``comfyui_version`` /system_stats reports, marked as simulated."""
        return f"{self.value}-sim"

    @property
    def is_newer(self) -> bool:
        """True for the 0.36-0.38 line (jobs API, assets, database lock, stricter prompt ids)."""
        return self is not ApiVersion.V0_3_64


DEFAULT_API_VERSION = ApiVersion.V0_3_64
CHOICES = [v.value for v in ApiVersion]


def default_api_version(environ: Mapping[str, str] | None = None) -> ApiVersion:
    """``SIM_API_VERSION`` (of ``environ``, default this process's) when set (ValueError naming
    it when it is not a known version), else 0.3.64."""
    raw = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not raw:
        return DEFAULT_API_VERSION
    try:
        return ApiVersion(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR}={raw!r} is not a simulated ComfyUI version; "
                         f"choose one of {', '.join(CHOICES)}") from None
