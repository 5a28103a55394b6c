"""The environment a Vast.ai-style host gives the worker, read once and checked as a whole.

The autoscaler side is switched on by ``REPORT_ADDR``: when it is unset (or empty) the worker
runs stand-alone and :meth:`AutoscalerEnv.from_environ` returns ``None``. When it is set, every
other variable the reports need must be present too, and a missing set is reported in one
error that names all of them, so an operator fixes the template once instead of once per
restart.

Facts from the public vastai SDK's server library: ``CONTAINER_ID`` is sent as an integer
``id``; ``MASTER_TOKEN`` is optional there (it defaults to an empty string) so it is optional
here, with a warning; the public URL is ``http(s)://$PUBLIC_IPADDR:$VAST_TCP_PORT_<WORKER_PORT>``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import InvalidEnvironment, MissingEnvironment

log = logging.getLogger(__name__)

_TRUE = frozenset({"1", "true", "yes", "on", "y", "t"})
_FALSE = frozenset({"0", "false", "no", "off", "n", "f", ""})


def _parse_bool(text: str) -> bool | None:
    """``None`` when the text is not a recognised boolean spelling."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    return None


def split_report_addrs(text: str) -> tuple[str, ...]:
    """Comma-separated base URLs, trimmed, without empty items or a trailing slash."""
    return tuple(part.strip().rstrip("/") for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class AutoscalerEnv:
    """Everything the reporter and the signature check need from the host's environment."""

    report_addrs: tuple[str, ...]
    container_id: int
    master_token: str
    public_ip: str
    public_port: int
    worker_port: int
    use_ssl: bool = False
    unsecured: bool = False

    @property
    def public_url(self) -> str:
        """The address clients reach this worker at; reported as ``url`` in every status."""
        scheme = "https" if self.use_ssl else "http"
        return f"{scheme}://{self.public_ip}:{self.public_port}"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], worker_port: int) -> AutoscalerEnv | None:
        """Read the autoscaler environment, or ``None`` when ``REPORT_ADDR`` is unset.

        Raises :class:`MissingEnvironment` naming every required variable that is unset or
        empty, then :class:`InvalidEnvironment` naming every value that cannot be used.
        """
        raw_addrs = environ.get("REPORT_ADDR", "").strip()
        if not raw_addrs:
            return None

        port_var = f"VAST_TCP_PORT_{worker_port}"
        required = ("CONTAINER_ID", "PUBLIC_IPADDR", port_var)
        missing = [name for name in required if not environ.get(name, "").strip()]
        if missing:
            raise MissingEnvironment(missing)

        problems: dict[str, str] = {}
        addrs = split_report_addrs(raw_addrs)
        if not addrs:
            problems["REPORT_ADDR"] = f"no address in {raw_addrs!r}"
        for addr in addrs:
            parts = urlsplit(addr)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                problems["REPORT_ADDR"] = f"{addr!r} is not an http(s) URL"
                break

        container_text = environ["CONTAINER_ID"].strip()
        container_id = 0
        try:
            container_id = int(container_text)
        except ValueError:
            # The autoscaler keys workers by an integer id; a string would be refused there.
            problems["CONTAINER_ID"] = f"{container_text!r} is not an integer"

        port_text = environ[port_var].strip()
        public_port = 0
        try:
            public_port = int(port_text)
            if not 1 <= public_port <= 65535:
                raise ValueError
        except ValueError:
            problems[port_var] = f"{port_text!r} is not a TCP port (1-65535)"

        flags: dict[str, bool] = {}
        for name in ("USE_SSL", "UNSECURED"):
            value = _parse_bool(environ.get(name, ""))
            if value is None:
                problems[name] = f"{environ[name]!r} is not a boolean (use true or false)"
                value = False
            flags[name] = value

        if problems:
            raise InvalidEnvironment(problems)

        master_token = environ.get("MASTER_TOKEN", "").strip()
        if not master_token:
            log.warning("MASTER_TOKEN is unset; status reports will carry an empty mtoken")
        if flags["UNSECURED"]:
            log.warning("UNSECURED is true: requests are served without checking their signature")

        return cls(
            report_addrs=addrs,
            container_id=container_id,
            master_token=master_token,
            public_ip=environ["PUBLIC_IPADDR"].strip(),
            public_port=public_port,
            worker_port=worker_port,
            use_ssl=flags["USE_SSL"],
            unsecured=flags["UNSECURED"],
        )
