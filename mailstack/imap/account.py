"""A user's IMAP account: mailbox listing, subscriptions, select (IAccount).

LIST follows RFC 3501 6.3.8 with RFC 5258 LIST-EXTENDED (selection
SUBSCRIBED, RECURSIVEMATCH and SPECIAL-USE; RETURN SUBSCRIBED, CHILDREN and
SPECIAL-USE), RFC 3348 CHILDREN attributes and RFC 6154 special-use
attributes; ``%`` does not cross the ``/`` separator, ``*`` does, and
``INBOX`` matches in any case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from twisted.mail import imap4
from zope.interface import implementer

from mailstack.imap.mailbox import SelectedMailbox
from mailstack.store.folders import (INBOX, SEPARATOR, SPECIAL_USE, MailboxError, Mailboxes,
                                     NoSuchMailbox, normalize, parents)


@dataclass
class ListEntry:
    name: str
    attributes: list[str] = field(default_factory=list)
    #: RFC 5258 CHILDINFO extended data.
    childinfo: bool = False


def pattern_regex(pattern: str) -> re.Pattern:
    if pattern[:5].upper() == INBOX and (len(pattern) == 5 or pattern[5] in "/*%"):
        pattern = INBOX + pattern[5:]
    out = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "%":
            out.append("[^/]*")
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out) + r"\Z", re.S)


@implementer(imap4.IAccount, imap4.INamespacePresenter)
class Account:
    def __init__(self, address: str, mailboxes: Mailboxes, run_blocking=None):
        self.address = address
        self.mailboxes = mailboxes
        self._run = run_blocking

    # -- listing --------------------------------------------------------------
    def list(self, reference: str, patterns: list[str], subscribed: bool = False,
             recursive: bool = False, special_only: bool = False,
             return_subscribed: bool = False) -> list[ListEntry]:
        names = self.mailboxes.names()
        subs = set(self.mailboxes.subscriptions()) if subscribed or return_subscribed else set()
        regexes = [pattern_regex(reference + p) for p in patterns]
        candidates = sorted(set(names) | (subs if subscribed else set()),
                            key=lambda n: (n != INBOX, n))
        with_children = {p for n in names for p in parents(n)}
        subscribed_parents = {p for s in subs for p in parents(s)}
        result = []
        for name in candidates:
            if not any(r.match(name) for r in regexes):
                continue
            attrs = []
            childinfo = False
            if name not in names:
                attrs.append("\\NonExistent")
            else:
                if not names[name]:
                    attrs.append("\\Noselect")
                attrs.append("\\HasChildren" if name in with_children else "\\HasNoChildren")
            if name in SPECIAL_USE and names.get(name):
                attrs.append(SPECIAL_USE[name])
            elif special_only:
                continue
            if name in subs:
                attrs.append("\\Subscribed")
            if subscribed and name not in subs:
                if not (recursive and name in subscribed_parents):
                    continue
                childinfo = True
            result.append(ListEntry(name, attrs, childinfo))
        return result

    def lsub(self, reference: str, pattern: str) -> list[ListEntry]:
        regex = pattern_regex(reference + pattern)
        names = self.mailboxes.names()
        result = []
        subs = self.mailboxes.subscriptions()
        listed = set()
        for name in subs:
            if regex.match(name):
                attrs = [] if names.get(name) else ["\\Noselect"]
                result.append(ListEntry(name, attrs))
                listed.add(name)
        if "%" in pattern:
            # RFC 3501 6.3.9: a parent of a subscribed name that "%" would
            # match is listed with \Noselect.
            for name in subs:
                for parent in parents(name):
                    if parent not in listed and regex.match(parent):
                        result.append(ListEntry(parent, ["\\Noselect"]))
                        listed.add(parent)
        return result

    # -- IAccount -------------------------------------------------------------
    def addMailbox(self, name, mbox=None):
        raise imap4.MailboxException("Use CREATE")

    def create(self, pathspec):
        try:
            self.mailboxes.create(pathspec)
        except MailboxError as e:
            raise imap4.MailboxException(str(e)) from None
        return True

    def select(self, name, rw=True):
        try:
            index = self.mailboxes.index(name)
        except (NoSuchMailbox, MailboxError):
            return None
        return SelectedMailbox(normalize(name), index, not rw, self._run)

    def delete(self, name):
        try:
            self.mailboxes.delete(name)
        except MailboxError as e:
            raise imap4.MailboxException(str(e)) from None

    def rename(self, oldname, newname):
        try:
            self.mailboxes.rename(oldname, newname)
        except MailboxError as e:
            raise imap4.MailboxException(str(e)) from None

    def isSubscribed(self, name):
        return normalize(name) in self.mailboxes.subscriptions()

    def subscribe(self, name):
        self.mailboxes.set_subscribed(name, True)

    def unsubscribe(self, name):
        self.mailboxes.set_subscribed(name, False)

    def listMailboxes(self, ref, wildcard):
        return [(e.name, _Info(e.attributes)) for e in self.list(ref, [wildcard])]

    # -- INamespacePresenter (RFC 2342) ------------------------------------------
    def getPersonalNamespaces(self):
        return [["", SEPARATOR]]

    def getSharedNamespaces(self):
        return None

    def getUserNamespaces(self):
        return None

    getOtherNamespaces = getUserNamespaces


@implementer(imap4.IMailboxInfo)
class _Info:
    def __init__(self, attributes):
        self._attributes = attributes

    def getFlags(self):
        return self._attributes

    def getHierarchicalDelimiter(self):
        return SEPARATOR
