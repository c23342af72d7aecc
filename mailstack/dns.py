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
import time
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


#: Seconds an answer stays cached at most, whatever its TTL (SECURITY-TESTS
#: DNS-7): a record published with a TTL of weeks, or a hostile one of years,
#: is asked again after this.
MAX_CACHE_TTL = 3600


class _Cache(dns.resolver.LRUCache):
    """dnspython's LRU cache of answers (positive, NODATA and NXDOMAIN, for
    their TTL or the SOA minimum, RFC 2308), none kept beyond ``max_ttl``."""

    def __init__(self, max_size: int, max_ttl: float):
        super().__init__(max_size)
        self.max_ttl = max_ttl

    def put(self, key, value) -> None:
        value.expiration = min(value.expiration, time.time() + self.max_ttl)
        super().put(key, value)


class Resolver:
    def __init__(self, config: DNSConfig, run_blocking: Callable[..., Deferred] | None = None,
                 max_ttl: float = MAX_CACHE_TTL):
        self._resolver = dns.resolver.Resolver(configure=not config.nameservers)
        if config.nameservers:
            self._resolver.nameservers = list(config.nameservers)
        self._resolver.port = config.port
        self._resolver.timeout = config.timeout
        self._resolver.lifetime = config.timeout
        self._resolver.cache = _Cache(10_000, max_ttl)
        self._run = run_blocking

    def run(self, method: Callable, *args) -> Deferred:
        """Call a blocking lookup method of this resolver in the thread pool."""
        return self._run(method, *args)

    def _query(self, name: str, rdtype: str, lifetime: float | None = None) -> list:
        try:
            answer = self._resolver.resolve(name, rdtype, search=False,
                                            raise_on_no_answer=False, lifetime=lifetime)
        except dns.resolver.NXDOMAIN:
            raise NotFound(name) from None
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong,
                dns.name.BadEscape):
            # RFC 1035 2.3.4: such a name cannot exist, now or later (permanent).
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

    # -- policy lookups (SPF, DKIM, DMARC, DNSBL); blocking, run them in the pool --
    @property
    def timeout(self) -> float:
        return self._resolver.lifetime

    def lookup(self, name: str, rdtype: str, lifetime: float | None = None) -> list:
        """Records of one type; [] for NODATA, NotFound for NXDOMAIN.

        ``lifetime`` shortens the configured timeout (a check's remaining
        budget), never lengthens it.
        """
        if lifetime is not None:
            lifetime = max(0.05, min(lifetime, self._resolver.lifetime))
        return self._query(name, rdtype, lifetime)

    def txt_bytes(self, name: str, lifetime: float | None = None) -> list[bytes]:
        """TXT records with their strings joined, as bytes (RFC 6376 3.6.2.2, RFC 7489 6.6.3)."""
        return [b"".join(r.strings) for r in self.lookup(name, "TXT", lifetime)]

    def spf_lookup(self, name: str, qtype: str, strict=True, timeout: float | None = None) -> list:
        """pyspf's ``DNSLookup(name, qtype, strict, timeout)`` hook over this resolver.

        Returns ``[((name, qtype), value), ...]`` as pyspf's own dnspython
        driver does (TXT: the list of strings as bytes, MX: (preference, host),
        A/AAAA: the address text, PTR: the host). NXDOMAIN and NODATA are an
        empty list (a void lookup, RFC 7208 4.6.4); a timeout or SERVFAIL
        raises ``spf.TempError`` (RFC 7208 2.6.6 temperror).
        """
        import spf
        query = name.rstrip(".")
        # RFC 7208 7.3: an expansion longer than 253 octets loses left-hand
        # labels until it fits (pyspf removes one at most; SECURITY-TESTS SPF-10).
        while len(query) > 253 and "." in query:
            query = query.split(".", 1)[1]
        try:
            records = self.lookup(query, qtype, timeout)
        except NotFound:
            return []
        except TemporaryDNSError as e:
            raise spf.TempError(f"DNS {e}") from None
        out = []
        for r in records:
            if qtype in ("A", "AAAA"):
                value = r.address
            elif qtype == "MX":
                value = (r.preference, r.exchange.to_text(omit_final_dot=True))
            elif qtype == "PTR":
                value = r.target.to_text(omit_final_dot=True)
            elif qtype in ("TXT", "SPF"):
                value = list(r.strings)
            else:
                continue
            out.append(((name, qtype), value))
        return out

    def dkim_txt(self, name: bytes | str, timeout: float | None = None) -> bytes | None:
        """dkimpy's ``dnsfunc(name, timeout=...)`` over this resolver.

        The first TXT record at ``name`` with its strings joined (RFC 6376
        3.6.2.2), None when there is none; a timeout or SERVFAIL raises
        ``dkim.DnsTimeoutError`` (RFC 6376 6.1.2: TEMPFAIL).
        """
        import dkim
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        try:
            records = self.txt_bytes(name.rstrip("."), timeout)
        except NotFound:
            return None
        except TemporaryDNSError as e:
            raise dkim.DnsTimeoutError(str(e)) from None
        return records[0] if records else None


def is_public_address(address: str) -> bool:
    """False for loopback, private, link-local and other non-routable addresses."""
    ip = ipaddress.ip_address(address)
    return ip.is_global and not ip.is_multicast
