"""Prometheus metrics, one registry per service (never the process-global one).

Several services in one process (tests, or two instances) keep their counts
apart. The protocol code is instrumented through narrow hooks rather than
counters sprinkled through it:

- ``Metrics.instrument(factory, protocol)`` wraps a listener factory:
  ``buildProtocol`` counts connections (and open ones), and the factory's
  cred Portal is wrapped so logins, failed logins and open IMAP/POP3
  sessions are counted by listener protocol;
- the SMTP factory, the policy chain and the outbound runner carry a
  ``metrics`` attribute (``NULL_METRICS`` until the service sets it) with
  one call each: ``smtp_transaction``, ``policy_verdict``, ``delivery``;
- the queue's size and age are read from the spool when scraped.

Counter and label names follow the Prometheus naming guide: a ``mailstack_``
prefix, ``_total`` for counters, base units (seconds).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from twisted.cred.error import UnauthorizedLogin

#: Sessions that log in and later log out (their avatar's logout is called).
_SESSION_PROTOCOLS = {"imap", "imaps", "pop3", "pop3s"}


class NullMetrics:
    """The hooks, doing nothing: the default of every instrumented object."""

    def smtp_transaction(self, role: str, result: str) -> None:
        pass

    def policy_verdict(self, checker: str, verdict) -> None:
        pass

    def delivery(self, status: str) -> None:
        pass

    def http_request(self, endpoint: str, code: int) -> None:
        pass


NULL_METRICS = NullMetrics()


class Metrics(NullMetrics):
    def __init__(self, spool=None):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.connections = Counter("mailstack_connections", "Connections accepted, by listener "
                                   "protocol", ["protocol"], registry=r)
        self.connections_open = Gauge("mailstack_connections_open", "Connections open now",
                                      ["protocol"], registry=r)
        self.smtp_transactions = Counter(
            "mailstack_smtp_transactions", "SMTP transactions (MAIL to the end of DATA) by "
            "role and result: queued, rejected, deferred", ["role", "result"], registry=r)
        self.policy_results = Counter(
            "mailstack_policy_results", "Authentication results of inbound checks (RFC 8601 "
            "method: spf, dkim, dmarc, arc, ...) by result", ["method", "result"], registry=r)
        self.policy_actions = Counter(
            "mailstack_policy_actions", "Verdicts of policy checkers other than continue",
            ["checker", "action"], registry=r)
        self.deliveries = Counter(
            "mailstack_delivery_attempts", "Remote delivery attempts per recipient by status: "
            "sent, deferred, bounced", ["status"], registry=r)
        self.logins = Counter("mailstack_logins", "Successful logins by listener protocol",
                              ["protocol"], registry=r)
        self.auth_failures = Counter("mailstack_auth_failures", "Logins refused for wrong "
                                     "credentials, by listener protocol", ["protocol"],
                                     registry=r)
        self.sessions = Counter("mailstack_sessions", "IMAP and POP3 sessions (logins) by "
                                "listener protocol", ["protocol"], registry=r)
        self.sessions_open = Gauge("mailstack_sessions_open", "IMAP and POP3 sessions logged "
                                   "in now", ["protocol"], registry=r)
        self.http_requests = Counter("mailstack_http_requests", "HTTP requests by endpoint "
                                     "and status code", ["endpoint", "code"], registry=r)
        if spool is not None:
            r.register(_QueueCollector(spool))

    def render(self) -> bytes:
        """The text exposition format (blocking when the spool is listed: run it in the pool)."""
        return generate_latest(self.registry)

    # -- hooks -----------------------------------------------------------------
    def smtp_transaction(self, role: str, result: str) -> None:
        word = result.split(" ", 1)[0]
        outcome = {"queued": "queued", "reject": "rejected"}.get(word, "deferred")
        self.smtp_transactions.labels(role, outcome).inc()

    def policy_verdict(self, checker: str, verdict) -> None:
        for clause in verdict.results:
            method = getattr(clause, "method", None) or checker
            self.policy_results.labels(str(method), str(getattr(clause, "result", ""))).inc()
        action = getattr(verdict.action, "value", str(verdict.action))
        if action != "continue":
            self.policy_actions.labels(checker, action).inc()

    def delivery(self, status: str) -> None:
        self.deliveries.labels(status).inc()

    def http_request(self, endpoint: str, code: int) -> None:
        self.http_requests.labels(endpoint, str(code)).inc()

    def instrument(self, factory, protocol: str) -> None:
        """Count the connections of a listener factory and the logins through its portal."""
        build = factory.buildProtocol
        total = self.connections.labels(protocol)
        current = self.connections_open.labels(protocol)

        def buildProtocol(addr):
            p = build(addr)
            if p is None:
                return None
            total.inc()
            current.inc()
            lost = p.connectionLost
            closed = []

            def connectionLost(reason=None):
                if not closed:
                    closed.append(True)
                    current.dec()
                return lost(reason)

            p.connectionLost = connectionLost
            return p

        factory.buildProtocol = buildProtocol
        factory.metrics = self
        portal = getattr(factory, "portal", None)
        if portal is not None:
            factory.portal = CountingPortal(portal, self, protocol)


class CountingPortal:
    """A cred Portal in front of the real one, counting by listener protocol."""

    def __init__(self, portal, metrics: Metrics, protocol: str):
        self.portal = portal
        self.metrics = metrics
        self.protocol = protocol

    def listCredentialsInterfaces(self):
        return self.portal.listCredentialsInterfaces()

    def login(self, credentials, mind, *interfaces):
        d = self.portal.login(credentials, mind, *interfaces)
        return d.addCallbacks(self._in, self._failed)

    def _in(self, result):
        m, protocol = self.metrics, self.protocol
        m.logins.labels(protocol).inc()
        if protocol not in _SESSION_PROTOCOLS:
            return result
        interface, avatar, logout = result
        m.sessions.labels(protocol).inc()
        current = m.sessions_open.labels(protocol)
        current.inc()
        done = []

        def counted_logout():
            if not done:
                done.append(True)
                current.dec()
            return logout()

        return interface, avatar, counted_logout

    def _failed(self, failure):
        if failure.check(UnauthorizedLogin):
            self.metrics.auth_failures.labels(self.protocol).inc()
        return failure


class _QueueCollector:
    """Queue size and the age of the oldest message, read from the spool when scraped.

    Queue ids begin with the arrival time in hex seconds (``spool.new_queue_id``),
    so no envelope needs to be opened.
    """

    def __init__(self, spool):
        self.spool = spool

    def describe(self):
        return []

    def collect(self):
        try:
            ids = self.spool.queued_ids()
        except OSError:
            ids = []
        arrivals = []
        for qid in ids:
            try:
                arrivals.append(int(qid[:8], 16))
            except ValueError:
                continue
        size = GaugeMetricFamily("mailstack_queue_messages", "Messages in the queue (local "
                                 "delivery pending, or remote delivery waiting)")
        size.add_metric([], len(ids))
        age = GaugeMetricFamily("mailstack_queue_oldest_age_seconds", "Age of the oldest "
                                "queued message (0: the queue is empty)")
        age.add_metric([], max(time.time() - min(arrivals), 0) if arrivals else 0)
        yield size
        yield age
