"""SPF (RFC 7208) at MAIL FROM, with pyspf over the one resolver.

The identity is the MAIL FROM domain, or ``postmaster@<HELO>`` for the null
sender (RFC 7208 2.4; SECURITY-TESTS SPF-8). pyspf enforces the RFC 7208
4.6.4 limits in strict mode: 10 DNS-querying terms (SPF-1, SPF-2), 10 MX or
PTR names (SPF-3), 2 void lookups (SPF-4); and the whole evaluation has a
time budget (``time_budget``, SPF-7), after which the result is temperror.

pyspf looks names up through its module-level ``DNSLookup`` hook. It is
replaced here, once, by a function that uses the resolver of the check
running in the current pool thread (``_context``), so every query goes
through ``mailstack.dns.Resolver`` with its timeouts and cache.

Results: pass, fail, softfail, neutral, none, permerror go into
Authentication-Results and Received-SPF (RFC 7208 9.1) and are left for
DMARC; temperror answers ``451 4.4.3`` (SPF-6, never a reject); fail is
refused with ``550 5.7.23`` (RFC 7372) only with ``reject_on_fail``.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import spf
from authres import SPFAuthenticationResult
from twisted.internet.defer import Deferred

from mailstack.policy.interface import (
    Checker, Connection, Environment, Transaction, proceed, reject, temperror)
from mailstack.policy.message import comment, printable

_context = threading.local()
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9_\-]+)+\.?\Z")


def _lookup(name, qtype, strict=True, timeout=None):
    resolver = getattr(_context, "resolver", None)
    if resolver is None:
        # Never fall back to another resolver (DESIGN: one resolver).
        raise spf.TempError("SPF lookup outside a mailstack policy check")
    return resolver.spf_lookup(name, qtype, strict, timeout)


spf.DNSLookup = _lookup


@dataclass(frozen=True)
class SPFOutcome:
    #: pass, fail, softfail, neutral, none, temperror or permerror.
    result: str
    #: "mailfrom" or "helo" (RFC 7208 2.3, 2.4).
    identity: str
    #: The domain checked (MAIL FROM domain or HELO name).
    domain: str
    explanation: str = ""
    received_spf: str = ""


def evaluate(resolver, ip: str, sender: str, helo: str, receiver: str,
             budget: float = 20.0) -> SPFOutcome:
    """Run one SPF check (blocking: call it in the thread pool)."""
    identity = "mailfrom" if sender else "helo"
    domain = sender.rpartition("@")[2].lower() if sender else helo.lower().rstrip(".")
    if not _HOSTNAME.match(domain or "-"):
        # An address literal or a bare word: nothing to look up (RFC 7208 4.3).
        return SPFOutcome("none", identity, domain, "no domain to check")
    _context.resolver = resolver
    try:
        q = spf.query(i=ip, s=sender, h=helo, receiver=receiver, strict=True,
                      timeout=resolver.timeout, querytime=budget)
        result, _, explanation = q.check()
        header = q.get_header(result, receiver=receiver)
    finally:
        _context.resolver = None
    return SPFOutcome(result, identity, domain, explanation, printable(header, 900))


class SPFChecker(Checker):
    name = "spf"
    stages = frozenset({"mail"})

    def __init__(self, settings, env: Environment):
        self.settings = settings
        self.env = env

    def mail_from(self, conn: Connection, txn: Transaction) -> Deferred:
        d = self.env.run_blocking(evaluate, self.env.resolver, conn.client_ip, txn.sender,
                                  conn.helo, self.env.hostname, self.settings.time_budget)
        return d.addCallback(self._verdict, conn, txn)

    def _verdict(self, outcome: SPFOutcome, conn: Connection, txn: Transaction):
        txn.state["spf"] = outcome
        if outcome.identity == "mailfrom":
            clause = SPFAuthenticationResult(result=outcome.result, smtp_mailfrom=outcome.domain)
        else:
            clause = SPFAuthenticationResult(result=outcome.result, smtp_helo=outcome.domain)
        if outcome.result == "temperror":
            return temperror(f"SPF check of {outcome.domain} failed temporarily (DNS), "
                             "try again later", results=[clause])
        if outcome.result == "fail" and self.settings.reject_on_fail:
            why = comment(outcome.explanation, 120)
            return reject(f"SPF fail: {outcome.domain} does not allow [{conn.client_ip}] to "
                          f"send its mail: {why}", "5.7.23")
        headers = [("Received-SPF", outcome.received_spf)] if outcome.received_spf else []
        return proceed(results=[clause], headers=headers)
