"""Where mail for a domain goes: MX hosts and their addresses, or the smarthost.

RFC 5321 5.1: MX records by preference (equal ones shuffled, done in
``dns.Resolver.mx``); no MX means the domain's own address records; a null
MX (RFC 7505) means the domain accepts no mail. Hosts with loopback or
private addresses are skipped unless ``[outbound] allow_private`` says so,
which keeps a hostile DNS answer from turning the queue against the local
network. Blocking (DNS): run in the thread pool.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mailstack.config import OutboundConfig
from mailstack.dns import NotFound, Resolver, TemporaryDNSError, is_public_address


@dataclass(frozen=True)
class Route:
    host: str
    addresses: tuple[str, ...]
    port: int

    def label(self, address: str) -> str:
        """Postfix's ``relay=host[ip]:port``."""
        return f"{self.host}[{address}]:{self.port}"


class NoRoute(Exception):
    """The domain cannot receive mail: a permanent failure, the text is the reply."""


def resolve_routes(resolver: Resolver, domain: str, config: OutboundConfig) -> list[Route]:
    """The hosts to try in order; NoRoute or TemporaryDNSError when there are none."""
    if config.relay:
        host, _, port = config.relay.rpartition(":")
        host = host.strip("[]")
        return [Route(host, _addresses(resolver, host), int(port))]
    if domain.startswith("["):
        literal = domain.strip("[]").removeprefix("IPv6:")
        return _filter([Route(domain, (literal,), config.port)], config)
    try:
        mx = resolver.mx(domain)
    except NotFound:
        raise NoRoute(f"550 5.4.4 Host or domain name not found: {domain}") from None
    if mx == []:
        raise NoRoute(f"556 5.1.10 Domain {domain} does not accept mail (null MX, RFC 7505)")
    hosts = [domain] if mx is None else [h.host for h in mx]
    routes, temporary = [], None
    for host in hosts:
        try:
            addresses = resolver.addresses(host)
        except TemporaryDNSError as e:
            temporary = e
            continue
        if addresses:
            routes.append(Route(host, tuple(addresses), config.port))
    usable = _filter(routes, config)
    if usable:
        return usable
    if temporary is not None:
        raise temporary
    if routes:
        raise NoRoute(f"550 5.4.4 The mail exchangers of {domain} have only private addresses")
    raise NoRoute(f"550 5.4.4 No address found for the mail exchangers of {domain}")


def _addresses(resolver: Resolver, host: str) -> tuple[str, ...]:
    try:
        ipaddress.ip_address(host)
        return (host,)
    except ValueError:
        pass
    try:
        found = resolver.addresses(host)
    except NotFound:
        found = []
    if not found:
        raise TemporaryDNSError(f"the relay host {host} has no address")
    return tuple(found)


def _filter(routes: list[Route], config: OutboundConfig) -> list[Route]:
    if config.allow_private:
        return routes
    kept = []
    for route in routes:
        public = tuple(a for a in route.addresses if is_public_address(a))
        if public:
            kept.append(Route(route.host, public, route.port))
    return kept
