"""DNS block lists (RFC 5782), looked up when the client connects.

The lookups for every configured zone start at connect, in the pool, and
do not delay the greeting; the answer is given at RCPT TO, as Postfix's
``reject_rbl_client`` does, once the sender is known (an allow-listed
sender skips it) and where every client handles a refusal well:
``554 5.7.1 Service unavailable; client [ip] blocked using <zone>``.

A listing is an A record in 127.0.0.0/8 (RFC 5782 2.1), except
127.255.255.0/24, which Spamhaus and others use for "query refused" errors,
not listings. NXDOMAIN is "not listed". A timeout or SERVFAIL answers
``451 4.4.3`` (DESIGN invariant 6: never a silent pass).
"""

from __future__ import annotations

import ipaddress

from twisted.internet.defer import Deferred, DeferredList, succeed

from mailstack.dns import NotFound, TemporaryDNSError
from mailstack.policy.interface import (
    CONTINUE, Checker, Connection, Environment, Transaction, reject, temperror)


def query_name(ip: str, zone: str) -> str:
    """RFC 5782 2.1 (IPv4: reversed octets) and 2.4 (IPv6: reversed nibbles)."""
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    reverse = address.reverse_pointer.rsplit(".", 2)[0]
    return f"{reverse}.{zone.rstrip('.')}"


def lookup(resolver, ip: str, zone: str) -> tuple[str, str]:
    """(zone, "listed" | "clear" | "temporary") (blocking)."""
    try:
        records = resolver.lookup(query_name(ip, zone), "A")
    except NotFound:
        return zone, "clear"
    except TemporaryDNSError:
        return zone, "temporary"
    for r in records:
        a = ipaddress.ip_address(r.address)
        if a in _LISTED and a not in _ERRORS:
            return zone, "listed"
    return zone, "clear"


_LISTED = ipaddress.ip_network("127.0.0.0/8")
_ERRORS = ipaddress.ip_network("127.255.255.0/24")


class _Pending:
    """A result several RCPTs wait for."""

    def __init__(self, d: Deferred):
        self.result = None
        self._waiters: list[Deferred] = []
        d.addCallback(self._fired)

    def _fired(self, result):
        self.result = result
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(result)

    def wait(self) -> Deferred:
        if self.result is not None:
            return succeed(self.result)
        d = Deferred()
        self._waiters.append(d)
        return d


class DNSBLChecker(Checker):
    name = "dnsbl"
    stages = frozenset({"connect", "rcpt"})

    def __init__(self, settings, env: Environment):
        self.zones = tuple(settings.zones)
        self.env = env

    def connect(self, conn: Connection) -> Deferred:
        if self.zones and not conn.allowed:
            lookups = [self.env.run_blocking(lookup, self.env.resolver, conn.client_ip, zone)
                       for zone in self.zones]
            d = DeferredList(lookups, consumeErrors=True)
            d.addCallback(lambda results: [r if ok else ("?", "temporary")
                                           for ok, r in results])
            conn.state[self.name] = _Pending(d)
        return succeed(CONTINUE)

    def rcpt_to(self, conn: Connection, txn: Transaction, recipient: str) -> Deferred:
        pending = conn.state.get(self.name)
        if pending is None or conn.allowed or txn.allowed:
            return succeed(CONTINUE)
        return pending.wait().addCallback(self._verdict, conn)

    @staticmethod
    def _verdict(results, conn: Connection):
        for zone, status in results:
            if status == "listed":
                return reject(f"Service unavailable; client [{conn.client_ip}] blocked "
                              f"using {zone}", code=554)
        for zone, status in results:
            if status == "temporary":
                return temperror(f"DNSBL lookup in {zone} failed temporarily, "
                                 "try again later")
        return CONTINUE
