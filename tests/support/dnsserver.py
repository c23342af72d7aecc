"""A real DNS server on 127.0.0.1 for the tests (twisted.names), serving test zones.

Zones are a dict: ``{"name": {"MX": [(10, "mx.name")], "A": ["127.0.0.1"],
"TXT": ["v=spf1 -all", ["long", "split"]],
"SRV": [(0, 1, 993, "mx.name")]}}``. Names in ``hang`` are never
answered (a timeout for the client), names in ``servfail`` get SERVFAIL,
names in ``delay`` (``{"name": seconds}``) are answered that late,
unknown names get NXDOMAIN and known names without the asked type get an
empty NOERROR answer (NODATA). ``records`` may be changed while it runs.

As a recursive resolver would, it follows CNAMEs for the asked type and
answers with the whole chain (a loop ends where a name repeats); negative
answers carry an SOA in the authority section (RFC 2308, so clients may
cache them); an answer over UDP larger than 512 octets is sent truncated
(TC, no records) so the client retries over TCP (RFC 1035 4.2.1).
``queries`` lists (name, type) and ``transports`` (udp or tcp, name, type)
of every question asked.
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


def _soa(name: str) -> dns.RRHeader:
    """The SOA of a negative answer for ``name``: its top-level label as the zone."""
    zone = name.rpartition(".")[2].encode() or b"."
    return dns.RRHeader(zone, dns.SOA, dns.IN, 60,
                        dns.Record_SOA(b"ns." + zone, b"hostmaster." + zone, minimum=60, ttl=60),
                        auth=True)


class ZoneResolver(common.ResolverBase):
    def __init__(self, records: dict, hang=(), servfail=(), delay=None):
        super().__init__()
        self.records = {k.lower().rstrip("."): v for k, v in records.items()}
        self.hang = {h.lower() for h in hang}
        self.servfail = {s.lower() for s in servfail}
        self.delay = {k.lower(): v for k, v in (delay or {}).items()}
        self.queries: list[tuple[str, str]] = []
        #: Delayed answers not sent yet (dropped at stop).
        self.pending: set = set()

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
        answers, owner, seen = [], key, {key}
        # A chain of CNAMEs, as a recursive resolver answers it (RFC 1034 3.6.2).
        while rtype != "CNAME" and not self.records.get(owner, {}).get(rtype) \
                and self.records.get(owner, {}).get("CNAME"):
            target = self.records[owner]["CNAME"][0].lower().rstrip(".")
            answers.append(dns.RRHeader(owner.encode(), dns.CNAME, cls, 60,
                                        _payload("CNAME", target, 60), auth=True))
            if target in seen:
                break
            seen.add(target)
            owner = target
        answers += [dns.RRHeader(owner.encode(), type, cls, 60, _payload(rtype, value, 60),
                                 auth=True)
                    for value in self.records.get(owner, {}).get(rtype, ())]
        result = (answers, [] if answers else [_soa(key)], [])
        if key in self.delay:
            d = defer.Deferred()

            def answer():
                self.pending.discard(call)
                d.callback(result)

            call = reactor.callLater(self.delay[key], answer)
            self.pending.add(call)
            return d
        return defer.succeed(result)


class _Factory(server.DNSServerFactory):
    """Answers SERVFAIL for DNSServerError (the stock factory sends NXDOMAIN for
    it), NXDOMAIN with an SOA, and records the transport of each question."""

    transports: list

    def handleQuery(self, message, protocol, address):
        for query in message.queries:
            self.transports.append(("tcp" if address is None else "udp",
                                    query.name.name.decode("ascii", "replace").lower(),
                                    dns.QUERY_TYPES.get(query.type, str(query.type))))
        return super().handleQuery(message, protocol, address)

    def gotResolverError(self, failure, protocol, message, address):
        if failure.check(error.DNSServerError):
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return None
        if failure.check(error.DomainError) and message.queries:
            name = message.queries[0].name.name.decode("ascii", "replace").lower()
            response = self._responseFromMessage(message=message, rCode=dns.ENAME,
                                                 authority=[_soa(name)])
            self.sendReply(protocol, response, address)
            return None
        return super().gotResolverError(failure, protocol, message, address)


class _Datagram(dns.DNSDatagramProtocol):
    """UDP answers that do not fit are sent truncated: header, question, TC set."""

    LIMIT = 512  # RFC 1035 4.2.1, for a query without EDNS

    def writeMessage(self, message, address):
        data = message.toStr()
        if len(data) > max(self.LIMIT, getattr(message, "maxSize", 0) or 0):
            short = dns.Message(id=message.id, answer=1, opCode=message.opCode,
                                auth=message.auth, trunc=1, recDes=message.recDes,
                                recAv=message.recAv, rCode=message.rCode)
            short.queries = list(message.queries)
            data = short.toStr()
        self.transport.write(data, address)


class DNSFixture:
    """Start with ``start()``; ``port`` is where both UDP and TCP listen."""

    def __init__(self, records: dict, hang=(), servfail=(), delay=None):
        self.resolver = ZoneResolver(records, hang, servfail, delay)
        self.factory = _Factory(authorities=[self.resolver])
        self.factory.noisy = False
        self.factory.transports = self.transports = []
        self._ports = []

    def datagram_protocol(self) -> dns.DNSDatagramProtocol:
        """The UDP side (it truncates answers over 512 octets)."""
        return _Datagram(self.factory)

    def start(self) -> int:
        # The TCP port must equal the (ephemeral) UDP one; another process may
        # hold it on TCP, so try a few UDP ports.
        for _ in range(20):
            udp = reactor.listenUDP(0, self.datagram_protocol(), interface="127.0.0.1")
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
        for call in list(self.resolver.pending):
            if call.active():
                call.cancel()
        self.resolver.pending.clear()
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self._ports])

    @property
    def config(self) -> dict:
        """The [dns] section that points a mailstack at this server."""
        return {"nameservers": ["127.0.0.1"], "port": self.port, "timeout": 1.0}
