"""Allow- and block-lists: client addresses, HELO names, envelope senders.

One file (``[policy.lists] file``), re-read when it changes (``ReloadingFile``,
as the users and aliases files are), one entry a line::

    # action  kind    value
    allow     ip      192.0.2.0/24          # an address or a network
    block     ip      2001:db8:bad::/48
    allow     helo    mx.partner.example    # that name exactly
    block     helo    .dynamic.example      # a leading dot: the domain and all below it
    allow     sender  alice@partner.example # that address
    block     sender  spam.example          # every address at that domain
    block     sender  .spam.example         # ... and at its subdomains

The most specific matching entry wins (the longest network, an address
before its domain, a domain before its parent); when an allow and a block
entry are equally specific, the block wins.

A block answers ``554 5.7.1`` at the stage it matches (connect, HELO, MAIL
FROM). An allow marks the session (ip, helo) or the transaction (sender) as
allowed, which skips greylisting and the DNSBL check; it never skips DMARC,
so a forged From is still rejected. HELO names are the client's claim:
prefer ``ip`` entries for allowing.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet.defer import Deferred, succeed

from mailstack.auth.files import ReloadingFile
from mailstack.policy.interface import (
    CONTINUE, Checker, Connection, Environment, Transaction, reject)

_NAME = re.compile(r"\.?[a-z0-9_](?:[a-z0-9_\-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_\-]*[a-z0-9_])?)*\Z")


@dataclass(frozen=True)
class Entry:
    action: str
    kind: str
    value: str
    line: int


@dataclass
class Lists:
    networks: list[tuple[ipaddress._BaseNetwork, Entry]] = field(default_factory=list)
    helo: dict[str, list[Entry]] = field(default_factory=dict)
    sender: dict[str, list[Entry]] = field(default_factory=dict)

    def match_ip(self, ip: str) -> Entry | None:
        address = ipaddress.ip_address(ip)
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        best = None
        for net, entry in self.networks:
            if address.version == net.version and address in net:
                rank = (net.prefixlen, entry.action == "block")
                if best is None or rank > best[0]:
                    best = (rank, entry)
        return best[1] if best else None

    @staticmethod
    def _best(entries: list[Entry] | None) -> Entry | None:
        if not entries:
            return None
        return next((e for e in entries if e.action == "block"), entries[0])

    def match_name(self, table: dict[str, list[Entry]], name: str) -> Entry | None:
        """Exact name first, then ``.parent`` suffixes from the longest."""
        name = name.lower().rstrip(".")
        found = self._best(table.get(name))
        if found:
            return found
        labels = name.split(".")
        for i in range(len(labels)):
            found = self._best(table.get("." + ".".join(labels[i:])))
            if found:
                return found
        return None

    def match_sender(self, sender: str) -> Entry | None:
        if not sender:
            return None
        sender = sender.lower()
        return self._best(self.sender.get(sender)) or \
            self.match_name(self.sender, sender.rpartition("@")[2])


def parse(lines: list[str], path: Path) -> Lists:
    lists = Lists()
    for number, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) != 3 or parts[0] not in ("allow", "block") or \
                parts[1] not in ("ip", "helo", "sender"):
            raise ValueError(f"{path}:{number}: expected 'allow|block ip|helo|sender VALUE'")
        action, kind, value = parts[0], parts[1], parts[2].lower()
        entry = Entry(action, kind, value, number)
        if kind == "ip":
            try:
                lists.networks.append((ipaddress.ip_network(value, strict=False), entry))
            except ValueError:
                raise ValueError(f"{path}:{number}: {value!r} is not an address or network") \
                    from None
        elif kind == "helo":
            if not _NAME.match(value):
                raise ValueError(f"{path}:{number}: {value!r} is not a host name")
            lists.helo.setdefault(value.rstrip("."), []).append(entry)
        else:
            local, at, domain = value.rpartition("@")
            if (at and not local) or not _NAME.match(domain):
                raise ValueError(f"{path}:{number}: {value!r} is not an address or a domain")
            lists.sender.setdefault(value if at else domain, []).append(entry)
    return lists


class ListsChecker(Checker):
    name = "lists"
    stages = frozenset({"connect", "helo", "mail"})

    def __init__(self, settings, env: Environment):
        self.env = env
        self.file = ReloadingFile(settings.file, parse) if settings.file else None

    def _lists(self) -> Lists:
        return self.file.get() if self.file is not None else Lists()

    def connect(self, conn: Connection) -> Deferred:
        entry = self._lists().match_ip(conn.client_ip)
        return succeed(self._apply(entry, conn, None, f"client [{conn.client_ip}]"))

    def helo(self, conn: Connection) -> Deferred:
        lists = self._lists()
        if conn.allowed.startswith("helo "):
            conn.allowed = ""  # a new HELO replaces what the old name allowed
        entry = lists.match_name(lists.helo, conn.helo) if conn.helo else None
        return succeed(self._apply(entry, conn, None, f"HELO name {conn.helo}"))

    def mail_from(self, conn: Connection, txn: Transaction) -> Deferred:
        entry = self._lists().match_sender(txn.sender)
        return succeed(self._apply(entry, conn, txn, f"sender <{txn.sender}>"))

    @staticmethod
    def _apply(entry: Entry | None, conn: Connection, txn: Transaction | None, what: str):
        if entry is None:
            return CONTINUE
        if entry.action == "block":
            return reject(f"Access denied: {what} is blocked by local policy", code=554)
        why = f"{entry.kind} {entry.value}"
        if txn is not None:
            txn.allowed = why
        elif not conn.allowed:
            conn.allowed = why
        return CONTINUE
