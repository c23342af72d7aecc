"""A real DNS server on 127.0.0.1 for the tests (twisted.names), serving test zones.

Zones are a dict: ``{"name": {"MX": [(10, "mx.name")], "A": ["127.0.0.1"],
"TXT": ["v=spf1 -all", ["long", "split"]],
"SRV": [(0, 1, 993, "mx.name")]}}``. Names in ``hang`` are never
answered (a timeout for the client), names in ``servfail`` get SERVFAIL,
unknown names get NXDOMAIN and known names without the asked type get an
empty NOERROR answer (NODATA). ``records`` may be changed while it runs.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.names import common, dns, error, server

_TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "TXT": dns.TXT, "CNAME": dns.CNAME,
          "PTR": dns.PTR, "SRV": dns.SRV}


def _payload(rtype: str, value, ttl: int):
    if rtype == "A":
        return dns.Record_A(value, ttl=ttl)
    if rtype == "AAAA":
        return dns.Record_AAAA(value, ttl=ttl)
    if rtype == "MX":
        preference, host = value
        return dns.Record_MX(preference, b"" if host == "." else host.encode(), ttl=ttl)
    if rtype == "TXT":
        strings = [value] if isinstance(value, str) else list(value)
        # A character-string holds at most 255 octets (RFC 1035 3.3); longer
        # values (DKIM keys) are split as a zone file would write them.
        chunks = [s.encode()[i:i + 255] for s in strings for i in range(0, max(len(s), 1), 255)]
        return dns.Record_TXT(*chunks, ttl=ttl)
    if rtype == "CNAME":
        return dns.Record_CNAME(value.encode(), ttl=ttl)
    if rtype == "PTR":
        return dns.Record_PTR(value.encode(), ttl=ttl)
    if rtype == "SRV":
        priority, weight, port, target = value
        return dns.Record_SRV(priority, weight, port, b"" if target == "." else target.encode(),
                              ttl=ttl)
    raise ValueError(rtype)


class ZoneResolver(common.ResolverBase):
    def __init__(self, records: dict, hang=(), servfail=()):
        super().__init__()
        self.records = {k.lower().rstrip("."): v for k, v in records.items()}
        self.hang = {h.lower() for h in hang}
        self.servfail = {s.lower() for s in servfail}
        self.queries: list[tuple[str, str]] = []

    def _lookup(self, name, cls, type, timeout):
        key = name.decode("ascii").lower().rstrip(".")
        rtype = next((k for k, v in _TYPES.items() if v == type), str(type))
        self.queries.append((key, rtype))
        if key in self.hang:
            return defer.Deferred()  # never answered
        if key in self.servfail:
            return defer.fail(error.DNSServerError(key))
        if key not in self.records:
            return defer.fail(error.DomainError(key))
        answers = [dns.RRHeader(name, type, cls, 60, _payload(rtype, value, 60), auth=True)
                   for value in self.records[key].get(rtype, ())]
        return defer.succeed((answers, [], []))


class _Factory(server.DNSServerFactory):
    """Answers SERVFAIL for DNSServerError (the stock factory sends NXDOMAIN for it)."""

    def gotResolverError(self, failure, protocol, message, address):
        if failure.check(error.DNSServerError):
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return None
        return super().gotResolverError(failure, protocol, message, address)


class DNSFixture:
    """Start with ``start()``; ``port`` is where both UDP and TCP listen."""

    def __init__(self, records: dict, hang=(), servfail=()):
        self.resolver = ZoneResolver(records, hang, servfail)
        self.factory = _Factory(authorities=[self.resolver])
        self.factory.noisy = False
        self._ports = []

    def start(self) -> int:
        # The TCP port must equal the (ephemeral) UDP one; another process may
        # hold it on TCP, so try a few UDP ports.
        for _ in range(20):
            udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(self.factory),
                                    interface="127.0.0.1")
            self.port = udp.getHost().port
            try:
                tcp = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")
            except CannotListenError:
                udp.stopListening()
                continue
            self._ports = [udp, tcp]
            return self.port
        raise CannotListenError("127.0.0.1", 0, "no port free for both UDP and TCP")

    def stop(self) -> defer.Deferred:
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self._ports])

    @property
    def config(self) -> dict:
        """The [dns] section that points a mailstack at this server."""
        return {"nameservers": ["127.0.0.1"], "port": self.port, "timeout": 1.0}
