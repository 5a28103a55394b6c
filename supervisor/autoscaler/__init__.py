"""The Vast.ai-style autoscaler side of the worker.

* :mod:`.env` reads the host's environment (``REPORT_ADDR`` switches the mode on).
* :mod:`.auth` checks the autoscaler's signature on routed requests (key from :mod:`.pubkey`).
* :mod:`.reporter` counts requests and reports load and finished requests in the background.

Nothing here starts on import; the public server wires these pieces into its lifecycle.
"""

from .auth import (
    REQUIRED_AUTH_FIELDS,
    AuthData,
    ReplayGuard,
    RequestAuthenticator,
    parse_auth_data,
    parse_envelope,
    verify,
)
from .env import AutoscalerEnv
from .errors import (
    AuthError,
    AutoscalerEnvError,
    AutoscalerError,
    InvalidEnvironment,
    MissingEnvironment,
)
from .pubkey import PublicKeyFetcher, load_public_key
from .reporter import (
    PROTOCOL_VERSION,
    FinishedRequest,
    RequestOutcome,
    StatusReporter,
    WorkerStatus,
)

__all__ = [
    "PROTOCOL_VERSION",
    "REQUIRED_AUTH_FIELDS",
    "AuthData",
    "AuthError",
    "AutoscalerEnv",
    "AutoscalerEnvError",
    "AutoscalerError",
    "FinishedRequest",
    "InvalidEnvironment",
    "MissingEnvironment",
    "PublicKeyFetcher",
    "ReplayGuard",
    "RequestAuthenticator",
    "RequestOutcome",
    "StatusReporter",
    "WorkerStatus",
    "load_public_key",
    "parse_auth_data",
    "parse_envelope",
    "verify",
]
