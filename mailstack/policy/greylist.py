"""Greylisting (RFC 6647) at RCPT TO.

The first attempt of a (client network, envelope sender, recipient) triplet
is answered ``451 4.7.1``; a retry at least ``delay`` seconds later, within
``retry_window``, passes, and so does every later message of that triplet
until it has been unused for ``expiry`` seconds. A sender that passed once
from a client network is remembered the same way, so its mail to other
recipients is not delayed again. The client network is the /24 (IPv4) or
/64 (IPv6) of the client, so a sending farm retrying from a neighbour
address is not greylisted again (RFC 6647 4.1.1).

The state is a sqlite3 file, ``<state_dir>/greylist.sqlite``: a restart
forgets nothing. Authenticated sessions, trusted networks and allow-listed
clients or senders are never greylisted.
"""

from __future__ import annotations

import ipaddress
import math

from twisted.internet.defer import Deferred, succeed

from mailstack.policy.interface import (
    CONTINUE, Checker, Connection, Environment, Transaction, defer)
from mailstack.policy.sqlite import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS triplets (
    network TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    passed REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (network, sender, recipient)
);
CREATE TABLE IF NOT EXISTS senders (
    network TEXT NOT NULL,
    sender TEXT NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (network, sender)
);
"""


def client_network(ip: str, v4_prefix: int = 24, v6_prefix: int = 64) -> str:
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = v4_prefix if address.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class Greylist:
    """The triplet store (blocking methods: run them in the pool)."""

    def __init__(self, path, delay: float, retry_window: float, expiry: float):
        self.db = Database(path, SCHEMA)
        self.delay = delay
        self.retry_window = retry_window
        self.expiry = expiry
        self._pruned = 0.0

    def check(self, network: str, sender: str, recipient: str, now: float) -> float:
        """0 when the triplet may pass now, else the seconds left to wait."""

        def work(db) -> float:
            row = db.execute("SELECT last_seen FROM senders WHERE network = ? AND sender = ?",
                             (network, sender)).fetchone()
            if row is not None and now - row[0] < self.expiry:
                db.execute("UPDATE senders SET last_seen = ? WHERE network = ? AND sender = ?",
                           (now, network, sender))
                return 0.0
            row = db.execute("SELECT first_seen, last_seen, passed FROM triplets WHERE "
                             "network = ? AND sender = ? AND recipient = ?",
                             (network, sender, recipient)).fetchone()
            key = (network, sender, recipient)
            if row is not None:
                first, last, passed = row
                if passed and now - last < self.expiry:
                    db.execute("UPDATE triplets SET last_seen = ? WHERE network = ? AND "
                               "sender = ? AND recipient = ?", (now,) + key)
                    self._remember(db, network, sender, now)
                    return 0.0
                if not passed and now - first < self.retry_window:
                    if now - first >= self.delay:
                        db.execute("UPDATE triplets SET last_seen = ?, passed = ? WHERE "
                                   "network = ? AND sender = ? AND recipient = ?",
                                   (now, now) + key)
                        self._remember(db, network, sender, now)
                        return 0.0
                    db.execute("UPDATE triplets SET last_seen = ? WHERE network = ? AND "
                               "sender = ? AND recipient = ?", (now,) + key)
                    return self.delay - (now - first)
            db.execute("INSERT OR REPLACE INTO triplets (network, sender, recipient, first_seen, "
                       "last_seen, passed) VALUES (?, ?, ?, ?, ?, 0)", key + (now, now))
            return self.delay

        wait = self.db.transaction(work)
        if now - self._pruned > 3600:
            self._pruned = now
            self.prune(now)
        return max(wait, 0.0) if self.delay > 0 else 0.0

    @staticmethod
    def _remember(db, network: str, sender: str, now: float) -> None:
        db.execute("INSERT OR REPLACE INTO senders (network, sender, last_seen) VALUES (?, ?, ?)",
                   (network, sender, now))

    def prune(self, now: float) -> None:
        """Forget unconfirmed triplets past the retry window and unused passes."""
        self.db.execute("DELETE FROM triplets WHERE (passed = 0 AND first_seen < ?) OR "
                        "(passed > 0 AND last_seen < ?)",
                        (now - self.retry_window, now - self.expiry))
        self.db.execute("DELETE FROM senders WHERE last_seen < ?", (now - self.expiry,))

    def close(self) -> None:
        self.db.close()


class GreylistChecker(Checker):
    name = "greylist"
    stages = frozenset({"rcpt"})

    def __init__(self, settings, env: Environment):
        self.settings = settings
        self.env = env
        self.store = Greylist(env.state_dir / "greylist.sqlite", settings.delay,
                              settings.retry_window, settings.expiry)

    def close(self) -> None:
        self.store.close()

    def rcpt_to(self, conn: Connection, txn: Transaction, recipient: str) -> Deferred:
        if conn.user or conn.allowed or txn.allowed:
            return succeed(CONTINUE)
        network = client_network(conn.client_ip, self.settings.ipv4_prefix,
                                 self.settings.ipv6_prefix)
        d = self.env.run_blocking(self.store.check, network, txn.sender.lower(),
                                  recipient.lower(), self.env.clock.seconds())
        return d.addCallback(self._verdict)

    @staticmethod
    def _verdict(wait: float):
        if wait <= 0:
            return CONTINUE
        # RFC 6647 2.1: a temporary failure; say when a retry will pass.
        return defer(f"Greylisted, please try again in {math.ceil(wait)} seconds", "4.7.1")
