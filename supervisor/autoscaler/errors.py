"""Exceptions raised by the autoscaler side of the worker.

The hierarchy is small on purpose: the CLI maps the environment errors to an exit code at
start-up, and the public server maps :class:`AuthError` to an HTTP response.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class AutoscalerError(Exception):
    """Base class for everything this package raises on purpose."""


class AutoscalerEnvError(AutoscalerError):
    """The Vast.ai-style environment is incomplete or malformed; the worker cannot start."""


class MissingEnvironment(AutoscalerEnvError):
    """One or more required variables are unset; the message names every one of them."""

    def __init__(self, missing: Iterable[str]) -> None:
        self.missing: tuple[str, ...] = tuple(missing)
        names = ", ".join(self.missing)
        super().__init__(
            "REPORT_ADDR is set, so the worker runs behind an autoscaler and also needs "
            f"these environment variables, which are unset or empty: {names}"
        )


class InvalidEnvironment(AutoscalerEnvError):
    """One or more variables are set but cannot be used; the message names each with the reason."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems: dict[str, str] = dict(problems)
        detail = "; ".join(f"{name}: {why}" for name, why in self.problems.items())
        super().__init__(f"invalid autoscaler environment: {detail}")


class AuthError(AutoscalerError):
    """A request's ``auth_data`` was refused.

    ``status`` is the HTTP status to answer with (401 or 422) and ``reason`` a short text for
    the response body; neither carries key material or the signature itself.
    """

    def __init__(self, status: int, reason: str, auth: "Any" = None) -> None:
        self.status = status
        self.reason = reason
        #: The well-formed auth_data whose check failed (an ``auth.AuthData``), when it was.
        self.auth = auth
        super().__init__(f"{status} {reason}")
