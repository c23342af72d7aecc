"""What a policy checker implements and what it answers.

A checker provides ``IChecker`` for the SMTP stages it names in ``stages``:

=============  ===================================  ============================
stage          method                               typical checks
=============  ===================================  ============================
``connect``    ``connect(conn)``                    DNSBL, connection rate, IP lists
``helo``       ``helo(conn)``                       HELO lists
``mail``       ``mail_from(conn, txn)``             SPF, sender lists, message rate
``rcpt``       ``rcpt_to(conn, txn, recipient)``    greylisting, recipients per message
``data``       ``end_of_data(conn, txn, message)``  DKIM, ARC, DMARC
=============  ===================================  ============================

Each method returns a Deferred that fires with a ``Verdict``; blocking work
(DNS, sqlite, crypto) runs through ``Environment.run_blocking``, never on the
reactor thread (DESIGN "One DNS resolver object"). The chain (``chain.py``)
calls the checkers in the configured order and stops at the first DEFER or
REJECT.

Verdicts:

* ``CONTINUE``: no objection; the next checker runs.
* ``ACCEPT``: the stage is decided, later checkers do not run for it.
* ``DEFER``: a 4xx reply (try again later); a DNS timeout or SERVFAIL is
  always ``temperror()``: ``451 4.4.3`` (DESIGN invariant 6).
* ``REJECT``: a 5xx reply.
* ``QUARANTINE``: accept, but deliver to each local recipient's Junk folder
  (Maildir++ ``.Junk``); later checkers still run and may still reject.

A verdict also carries what the checker found, for the message's headers:
RFC 8601 result clauses (``authres`` objects) for the one
``Authentication-Results`` header, and whole header fields such as
``Received-SPF``. Checkers share their findings through ``txn.state`` (the
SPF checker leaves an ``SPFOutcome`` under ``"spf"``, DKIM a list of
``SignatureResult`` under ``"dkim"``, which DMARC reads).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from zope.interface import Attribute, Interface, implementer

STAGES = ("connect", "helo", "mail", "rcpt", "data")


class Action(enum.Enum):
    CONTINUE = "continue"
    ACCEPT = "accept"
    DEFER = "defer"
    REJECT = "reject"
    QUARANTINE = "quarantine"


@dataclass(frozen=True)
class Verdict:
    action: Action
    #: The SMTP reply for DEFER and REJECT (RFC 5321 4.2, RFC 3463 codes).
    code: int = 0
    enhanced: str = ""
    text: str = ""
    #: RFC 8601 result clauses (``authres.core.AuthenticationResult``).
    results: tuple = ()
    #: Header fields to add, as (name, value) pairs, e.g. ``("Received-SPF", ...)``.
    headers: tuple[tuple[str, str], ...] = ()
    #: Why, in a few words, for the log line (QUARANTINE, ACCEPT).
    reason: str = ""

    @property
    def final(self) -> bool:
        """DEFER and REJECT end the stage with an error reply."""
        return self.action in (Action.DEFER, Action.REJECT)


CONTINUE = Verdict(Action.CONTINUE)


def proceed(results=(), headers=()) -> Verdict:
    """No objection, with findings for the headers."""
    return Verdict(Action.CONTINUE, results=tuple(results), headers=tuple(headers))


def accept(reason: str = "", results=()) -> Verdict:
    return Verdict(Action.ACCEPT, reason=reason, results=tuple(results))


def defer(text: str, enhanced: str = "4.7.1", code: int = 451, results=()) -> Verdict:
    return Verdict(Action.DEFER, code, enhanced, text, tuple(results))


def temperror(text: str, results=()) -> Verdict:
    """A DNS timeout or SERVFAIL: 451 4.4.3 (RFC 3463 4.4.3 "Directory server failure")."""
    return Verdict(Action.DEFER, 451, "4.4.3", text, tuple(results))


def reject(text: str, enhanced: str = "5.7.1", code: int = 550, results=()) -> Verdict:
    return Verdict(Action.REJECT, code, enhanced, text, tuple(results))


def quarantine(reason: str, results=(), headers=()) -> Verdict:
    return Verdict(Action.QUARANTINE, reason=reason, results=tuple(results),
                   headers=tuple(headers))


@dataclass
class Connection:
    """One SMTP session as the checkers see it."""

    client_ip: str
    client_port: int = 0
    #: The HELO/EHLO name ("" before it is given).
    helo: str = ""
    tls: bool = False
    #: The SMTP AUTH identity ("" when not authenticated).
    user: str = ""
    #: The client is in ``trusted_networks`` (the chain does not run at all).
    trusted: bool = False
    #: Why an allow-list entry lets this client skip greylisting and DNSBL.
    allowed: str = ""
    #: Set by a QUARANTINE verdict at connect or HELO: every message goes to Junk.
    quarantine: str = ""
    #: Each checker's own session state, by checker name.
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class Transaction:
    """One MAIL FROM .. end of data."""

    #: The reverse path, "" for the null sender ``<>``.
    sender: str
    #: Recipients accepted so far (as given in RCPT TO).
    recipients: list[str] = field(default_factory=list)
    #: Why an allow-list entry lets this sender skip greylisting and DNSBL.
    allowed: str = ""
    #: RFC 8601 result clauses collected from the verdicts, in chain order.
    results: list = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    #: Set by a QUARANTINE verdict: the reason the message goes to Junk.
    quarantine: str = ""
    #: Findings shared between checkers ("spf", "dkim", ...), by checker name.
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2].lower() if self.sender else ""


@dataclass(frozen=True)
class Message:
    """The message as the client sent it (CRLF line ends, dot-unstuffed).

    Our own trace headers (Return-Path, Received) are not part of it.
    """

    data: bytes

    def header_fields(self) -> list[tuple[str, str]]:
        """The header fields as (name, unfolded value), top first."""
        from mailstack.policy.message import header_fields
        return header_fields(self.data)


@dataclass(frozen=True)
class Environment:
    """What the chain gives every checker (STYLE 7: resolver and clock injected)."""

    #: ``mailstack.dns.Resolver``; its methods block, run them with ``run_blocking``.
    resolver: Any
    #: ``IReactorTime`` (``twisted.internet.task.Clock`` in unit tests).
    clock: Any
    #: ``run_blocking(f, *args)``: run ``f`` in the bounded thread pool.
    run_blocking: Callable[..., Deferred]
    #: Our host name, and the authserv-id of Authentication-Results (RFC 8601 2.5).
    hostname: str
    authserv_id: str
    #: Where checkers keep state on disk (greylisting, DMARC evaluations).
    state_dir: Path
    #: The local domains (mail for them is delivered here).
    local_domains: tuple[str, ...] = ()


class IChecker(Interface):
    """A policy check, called by the chain at the stages it names."""

    name = Attribute("Short name for the logs, e.g. 'spf'.")
    stages = Attribute("The stages it handles, a subset of interface.STAGES.")

    def connect(conn):
        """After the TCP connection is accepted; Deferred[Verdict]."""

    def helo(conn):
        """After HELO/EHLO (``conn.helo`` is set); Deferred[Verdict]."""

    def mail_from(conn, txn):
        """After MAIL FROM (``txn.sender``); Deferred[Verdict]."""

    def rcpt_to(conn, txn, recipient):
        """For each RCPT TO; a DEFER or REJECT refuses that recipient only."""

    def end_of_data(conn, txn, message):
        """After the final dot, before the 250; ``message`` is a ``Message``."""

    def close():
        """Release resources (files, databases) when the service stops."""


@implementer(IChecker)
class Checker:
    """A base class: every stage answers CONTINUE; override the ones you need
    and list them in ``stages``."""

    name = "checker"
    stages: frozenset[str] = frozenset()

    def connect(self, conn: Connection) -> Deferred:
        return succeed(CONTINUE)

    def helo(self, conn: Connection) -> Deferred:
        return succeed(CONTINUE)

    def mail_from(self, conn: Connection, txn: Transaction) -> Deferred:
        return succeed(CONTINUE)

    def rcpt_to(self, conn: Connection, txn: Transaction, recipient: str) -> Deferred:
        return succeed(CONTINUE)

    def end_of_data(self, conn: Connection, txn: Transaction, message: Message) -> Deferred:
        return succeed(CONTINUE)

    def close(self) -> None:
        pass
