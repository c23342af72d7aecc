"""The one DNS resolver: every lookup mailstack makes goes through here.

dnspython does the work (with its TCP fallback for truncated answers);
the nameservers, port and timeout come from the ``[dns]`` config section, so
tests and operators can point it at any server. The blocking calls are meant
to run in the service's thread pool (``Resolver.run``), never on the reactor
thread (SECURITY-TESTS DNS-6).

Errors are sorted the way mail needs them (RFC 5321 5.1, RFC 7208 2.6):
a name that does not exist is ``NotFound`` (permanent); a timeout, SERVFAIL
or unreachable server is ``TemporaryDNSError`` (try again later, never a
pass and never a permanent failure).
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import Callable

import dns.exception
import dns.name
import dns.resolver
from twisted.internet.defer import Deferred

from mailstack.config import DNSConfig


class NotFound(Exception):
    """NXDOMAIN: the name does not exist."""


class TemporaryDNSError(Exception):
    """Timeout, SERVFAIL or no server reachable: the answer is unknown for now."""


@dataclass(frozen=True)
class MXHost:
    preference: int
    host: str


class Resolver:
    def __init__(self, config: DNSConfig, run_blocking: Callable[..., Deferred] | None = None):
        self._resolver = dns.resolver.Resolver(configure=not config.nameservers)
        if config.nameservers:
            self._resolver.nameservers = list(config.nameservers)
        self._resolver.port = config.port
        self._resolver.timeout = config.timeout
        self._resolver.lifetime = config.timeout
        self._resolver.cache = dns.resolver.LRUCache(10_000)
        self._run = run_blocking

    def run(self, method: Callable, *args) -> Deferred:
        """Call a blocking lookup method of this resolver in the thread pool."""
        return self._run(method, *args)

    def _query(self, name: str, rdtype: str) -> list:
        try:
            answer = self._resolver.resolve(name, rdtype, search=False,
                                            raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise NotFound(name) from None
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as e:
            raise TemporaryDNSError(f"{name} {rdtype}: {e}") from None
        except dns.exception.DNSException as e:
            raise TemporaryDNSError(f"{name} {rdtype}: {e}") from None
        return list(answer)

    def mx(self, domain: str) -> list[MXHost] | None:
        """MX hosts by preference, equal preferences shuffled (RFC 5321 5.1).

        None: the domain has no MX records (use its address records). An empty
        list: a null MX (RFC 7505), the domain accepts no mail.
        """
        records = self._query(domain, "MX")
        if not records:
            return None
        if any(r.exchange == dns.name.root for r in records):
            return []
        hosts = [MXHost(r.preference, r.exchange.to_text(omit_final_dot=True).lower())
                 for r in records]
        random.shuffle(hosts)
        hosts.sort(key=lambda h: h.preference)
        return hosts

    def addresses(self, host: str) -> list[str]:
        """IPv4 and IPv6 addresses of a host (IPv4 first); [] if it has none."""
        found = []
        temporary = None
        for rdtype in ("A", "AAAA"):
            try:
                found += [r.address for r in self._query(host, rdtype)]
            except NotFound:
                return []
            except TemporaryDNSError as e:
                temporary = e
        if not found and temporary is not None:
            raise temporary
        return found

    def txt(self, name: str) -> list[str]:
        """TXT records, each with its strings joined (RFC 7208 3.3)."""
        return [b"".join(r.strings).decode("utf-8", "replace") for r in self._query(name, "TXT")]


def is_public_address(address: str) -> bool:
    """False for loopback, private, link-local and other non-routable addresses."""
    ip = ipaddress.ip_address(address)
    return ip.is_global and not ip.is_multicast
