"""Outbound target checks: keep client-chosen URLs away from the worker's own network.

A request may name its own webhook URL. Without a check, a client could make the worker POST
to services that are reachable only from inside the host or the provider's network (the cloud
metadata address 169.254.169.254, a database on 127.0.0.1, a neighbour on 10.0.0.0/8). This
module decides, for one URL, whether every address its host resolves to is public.

Two layers use it:
- ``check_url`` before a delivery (and at request validation) gives a clear message;
- ``GuardedResolver`` plugs into aiohttp's connector so the addresses actually connected to
  pass the same test, which closes the gap where DNS answers differently the second time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver

if TYPE_CHECKING:
    from aiohttp.abc import ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetError(OSError):
    """A URL that cannot be used as an outbound target."""


class TargetRefused(TargetError):
    """The target is malformed or points into a non-public network; retrying will not help."""


class TargetUnresolvable(TargetError):
    """The host name did not resolve; this may be temporary (a DNS outage)."""


@dataclass(frozen=True)
class HttpTarget:
    """The parts of an http(s) URL that the checks need."""

    scheme: str
    host: str
    port: int


def redact_url(url: str) -> str:
    """The URL without user info, query or fragment: those may carry tokens and must not be logged."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return "<unparseable url>"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_http_url(url: str) -> HttpTarget:
    """Split an absolute http(s) URL, or raise TargetRefused saying what is wrong with it."""
    if not isinstance(url, str) or not url.strip():
        raise TargetRefused("the URL is empty")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"the URL is malformed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise TargetRefused(f"the URL must start with http:// or https:// (got {redact_url(url)!r})")
    host = parts.hostname
    if not host:
        raise TargetRefused(f"the URL has no host ({redact_url(url)!r})")
    if port is None:
        port = 443 if scheme == "https" else 80
    return HttpTarget(scheme=scheme, host=host, port=port)


def non_public_reason(address: IPAddress) -> str | None:
    """Why an address is not a public unicast address, in words; None when it is public."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # ::ffff:127.0.0.1 reaches 127.0.0.1; judge the IPv4 address it wraps.
        address = address.ipv4_mapped
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if isinstance(address, ipaddress.IPv6Address) and address in _UNIQUE_LOCAL:
        return "unique-local"
    if address.is_multicast:
        return "multicast"
    if address.is_private:
        return "private"
    if not address.is_global:
        # Shared address space (100.64.0.0/10), documentation and reserved ranges.
        return "non-public"
    return None


_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def resolve_addresses(host: str, port: int) -> list[IPAddress]:
    """All addresses ``host`` resolves to, through the loop's getaddrinfo (never blocking the loop)."""
    literal = _literal_address(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetUnresolvable(f"host {host!r} does not resolve ({exc})") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        # sockaddr[0] may carry an IPv6 zone ("fe80::1%eth0"); ipaddress understands it.
        found = _literal_address(str(sockaddr[0]))
        if found is not None and found not in addresses:
            addresses.append(found)
    if not addresses:
        raise TargetUnresolvable(f"host {host!r} resolved to no usable address")
    return addresses


def refuse_non_public(host: str, addresses: list[IPAddress]) -> None:
    """Raise TargetRefused when any of ``addresses`` is not public; one bad address is enough."""
    for address in addresses:
        reason = non_public_reason(address)
        if reason is not None:
            shown = host if str(address) == host else f"{host} ({address})"
            raise TargetRefused(
                f"target {shown} is a {reason} address; only public addresses are allowed "
                "(the operator can allow private targets)"
            )


async def check_url(url: str, allow_private: bool) -> HttpTarget:
    """Parse ``url`` and, unless ``allow_private``, make sure its host resolves only to public addresses.

    Raises TargetRefused (final) or TargetUnresolvable (may be temporary).
    """
    target = parse_http_url(url)
    if allow_private:
        return target
    addresses = await resolve_addresses(target.host, target.port)
    refuse_non_public(target.host, addresses)
    return target


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that refuses host names resolving to non-public addresses.

    aiohttp skips the resolver for IP literals, so literal hosts must be checked before the
    request (``check_url`` does that); this class covers names, at connect time.
    """

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner if inner is not None else ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        addresses = [a for a in (_literal_address(str(r["host"])) for r in results) if a is not None]
        refuse_non_public(host, addresses)
        return results

    async def close(self) -> None:
        await self._inner.close()
